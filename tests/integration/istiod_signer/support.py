"""What the istiod signer tests share: a CA directory, istiod in RA mode, a sidecar's request."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from tests.support import pki
from tests.support.certs import write_ca_dir
from tests.testbed.istio import IstioClient, IstioResult
from tests.testbed.istiod import ISTIOD_SAN, Istiod, start_istiod
from tests.testbed.kube import KubeCluster, unique_name

__all__ = ["ca_dir", "istiod_ra", "istiod_self_signed_root", "sidecar_request", "signer_domain"]


def signer_domain() -> str:
    """A signer-name domain of this test alone (the apiserver is shared by the session)."""
    return f"{unique_name('csr')}.test"


def ca_dir(path: Path, key_kind: str = "ec256") -> x509.Certificate:
    """An Istio cacerts directory with an intermediate signing CA; returns the root."""
    _, _, root = write_ca_dir(path, intermediate=True, key_kind=key_kind)  # type: ignore[arg-type]
    return root


def istiod_ra(
    kube: KubeCluster,
    workdir: Path,
    *,
    root: x509.Certificate | None,
    k8s_signer: str,
    cert_signer_domain: str = "",
    mesh_roots: dict[str, x509.Certificate] | None = None,
    extra_env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> Istiod:
    """istiod with EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API; ``root`` goes to
    ./etc/external-ca-cert/root-cert.pem, ``mesh_roots`` (full signer name -> root) to
    meshConfig.caCertificates."""
    if root is not None:
        root_file = workdir / "etc" / "external-ca-cert" / "root-cert.pem"
        root_file.parent.mkdir(parents=True, exist_ok=True)
        root_file.write_bytes(pki.certs_pem(root).encode())
    mesh = "trustDomain: cluster.local\n"
    if mesh_roots:
        mesh += "caCertificates:\n"
        for signer, cert in mesh_roots.items():
            pem = pki.certs_pem(cert).strip().replace("\n", "\n    ")
            mesh += f"- pem: |\n    {pem}\n  certSigners: [{signer}]\n"
    env = {"EXTERNAL_CA": "ISTIOD_RA_KUBERNETES_API", "K8S_SIGNER": k8s_signer, **(extra_env or {})}
    if cert_signer_domain:
        env["CERT_SIGNER_DOMAIN"] = cert_signer_domain
    return start_istiod(kube, workdir, env=env, mesh_config=mesh, extra_args=extra_args)


def sidecar_request(
    kube: KubeCluster,
    istiod: Istiod,
    client: IstioClient,
    tmp_path: Path,
    *,
    istiod_root: bytes,
    sa: str = "reviews",
    key_type: str = "rsa",
    cert_signer: str = "",
    ttl: str = "1h",
) -> tuple[IstioResult, str]:
    """A sidecar (Istio's own client code) asks istiod for its certificate; (result, SPIFFE id)."""
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, sa, pod=f"{sa}-1")
    root = tmp_path / f"istiod-root-{ns}.pem"
    root.write_bytes(istiod_root)
    res = client(
        ca_address=istiod.ca_address,
        root_cert=root,
        token=kube.token(ns, sa, pod=pod),
        namespace=ns,
        service_account=sa,
        key_type=key_type,
        ca_san=ISTIOD_SAN,
        cert_signer=cert_signer,
        ttl=ttl,
    )
    return res, f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


def cert_signer_requests(
    kube: KubeCluster,
    client: IstioClient,
    tmp_path: Path,
    *,
    domain: str,
    roots: dict[str, x509.Certificate],
    key_types: tuple[str, ...] = ("ec256",),
) -> dict[tuple[str, str], tuple[IstioResult, str]]:
    """istiod with ``CERT_SIGNER_DOMAIN=domain`` and each team's root in meshConfig: one sidecar
    per (team, key type) with ``ISTIO_META_CERT_SIGNER=team``; their (result, SPIFFE id)."""
    istiod = istiod_ra(
        kube,
        tmp_path / "istiod",
        root=None,  # with a root file istiod would append it to every CertSigner's chain too
        k8s_signer=f"{domain}/workloads",
        cert_signer_domain=domain,
        mesh_roots={f"{domain}/{team}": root for team, root in roots.items()},
    )
    try:
        istiod_root = istiod_self_signed_root(kube)
        return {
            (team, key): sidecar_request(
                kube, istiod, client, tmp_path, istiod_root=istiod_root, cert_signer=team, key_type=key
            )
            for team in roots
            for key in key_types
        }
    finally:
        istiod.stop()


def istiod_self_signed_root(kube: KubeCluster) -> bytes:
    """The root of istiod's own serving certificate with PILOT_CERT_PROVIDER=istiod: its
    self-signed CA in Secret istio-system/istio-ca-secret (read there, not from the
    istio-ca-root-cert ConfigMap, which another test's istiod may have rewritten)."""
    import base64

    import kubernetes.client as k8s

    from tests.support.waiting import wait_for

    def read() -> bytes | None:
        try:
            secret = kube.core.read_namespaced_secret("istio-ca-secret", "istio-system")
        except k8s.ApiException:
            return None
        data = (secret.data or {}).get("ca-cert.pem")
        return base64.b64decode(data) if data else None

    return wait_for(read, timeout=60, what="istio-system/istio-ca-secret")
