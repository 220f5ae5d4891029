"""Real istiod in EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API mode, csr-service (local CA) as its
Kubernetes CSR signer, a sidecar's own client code asking istiod; and what the signer refuses.

The chain a sidecar receives must verify to the root istiod was given
(``./etc/external-ca-cert/root-cert.pem``), carry that root once, and name exactly the caller.
"""

from __future__ import annotations

import base64
from pathlib import Path

import kubernetes.client as k8s
import pytest
from cryptography.x509.verification import VerificationError

from tests.integration.istiod_signer.support import (
    ca_dir,
    cert_signer_requests,
    istiod_ra,
    istiod_self_signed_root,
    sidecar_request,
    signer_domain,
)
from tests.support import pki
from tests.support.k8s_signer import (
    approve,
    create_csr,
    csr_failed,
    istiod_api,
    running_signer,
    wait_outcome,
)
from tests.testbed.istio import IstioClient
from tests.testbed.kube import KubeCluster

pytestmark = [pytest.mark.istiod, pytest.mark.istio, pytest.mark.kube]


@pytest.mark.parametrize("key_type", ["rsa", "ec256"])
def test_sidecar_gets_its_certificate_through_istiod(
    kube: KubeCluster, istio_client: IstioClient, tmp_path: Path, key_type: str
) -> None:
    signer = f"{signer_domain()}/workloads"
    root = ca_dir(tmp_path / "ca")
    with running_signer(kube, tmp_path, [signer], [f"--local-ca-dir={tmp_path / 'ca'}"]) as csr_service:
        istiod = istiod_ra(kube, tmp_path / "istiod", root=root, k8s_signer=signer)
        try:
            res, spiffe = sidecar_request(
                kube, istiod, istio_client, tmp_path, istiod_root=istiod_self_signed_root(kube), key_type=key_type
            )
        finally:
            istiod.stop()
        assert res.ok, f"{res.code}: {res.message}\n{istiod.log()[-3000:]}\n{csr_service.log()[-3000:]}"
        metrics = csr_service.metrics()

    assert pki.spiffe_uris(res.leaf) == [spiffe]
    certs = res.certificates
    # [leaf, intermediate, root(file)]: the signer wrote no root, istiod appended its own once.
    assert len(certs) == 3, [c.subject.rfc4514_string() for c in certs]
    assert certs[-1] == root
    pki.verify_chain(res.leaf, certs[1:-1], [root])
    assert pki.key_matches(res.leaf, pki.load_key(res.private_key))
    assert f'csr_service_k8s_signer_csrs_total{{result="signed",signer="{signer}"}} 1.0' in metrics


def test_refusals(kube: KubeCluster, tmp_path: Path) -> None:
    """Another user's CSR and a foreign trust domain or DNS name get Failed; a CSR of a signer name
    we do not serve and an unapproved one are left alone."""
    domain = signer_domain()
    signer = f"{domain}/workloads"
    ca_dir(tmp_path / "ca")
    as_istiod = istiod_api(kube)
    as_admin = k8s.CertificatesV1Api(kube.api_client)
    ours = "spiffe://cluster.local/ns/default/sa/reviews"

    def csr(uri: str = ours, dns: tuple[str, ...] = ()) -> bytes:
        return pki.csr_pem(pki.new_key(), uris=(uri,) if uri else (), dns=dns)

    with running_signer(kube, tmp_path, [signer], [f"--local-ca-dir={tmp_path / 'ca'}"]) as csr_service:
        # Created before the rest and never touched: not our signer name, and not approved.
        foreign_signer = create_csr(as_istiod, f"{signer_domain()}/workloads", csr())
        approve(kube, foreign_signer)
        unapproved = create_csr(as_istiod, signer, csr())

        other_user = create_csr(as_admin, signer, csr())
        foreign_td = create_csr(as_istiod, signer, csr("spiffe://evil.example/ns/default/sa/reviews"))
        dns_name = create_csr(as_istiod, signer, csr("", dns=("istiod.istio-system.svc",)))
        good = create_csr(as_istiod, signer, csr())
        for name in (other_user, foreign_td, dns_name, good):
            approve(kube, name)

        outcomes = {name: wait_outcome(kube, name) for name in (other_user, foreign_td, dns_name, good)}
        log = csr_service.log()

    assert outcomes[good].status.certificate, log[-3000:]
    leaf = pki.load_certs(base64.b64decode(outcomes[good].status.certificate))[0]
    assert pki.spiffe_uris(leaf) == [ours]
    for name, reason in (
        (other_user, "RequesterNotAllowed"),
        (foreign_td, "InvalidRequest"),
        (dns_name, "InvalidRequest"),
    ):
        failed = csr_failed(outcomes[name])
        assert failed is not None, (name, outcomes[name].status)
        assert failed.reason == reason, (name, outcomes[name].status)
        assert not outcomes[name].status.certificate
        assert f"refused CSR {name} " in log
        assert not any(c.type == "Denied" for c in outcomes[name].status.conditions)
    assert "evil.example" in csr_failed(outcomes[foreign_td]).message
    # Everything after them is done, so these were seen and left alone.
    for name in (foreign_signer, unapproved):
        obj = as_admin.read_certificate_signing_request(name)
        assert not (obj.status and obj.status.certificate), obj.status
        assert csr_failed(obj) is None, obj.status
        assert name not in log


def test_per_workload_signers_reach_different_issuers(
    kube: KubeCluster, istio_client: IstioClient, tmp_path: Path
) -> None:
    """ISTIO_META_CERT_SIGNER=team-a / team-b: istiod asks <CERT_SIGNER_DOMAIN>/team-a and /team-b,
    which --k8s-signer-issuers-file maps to two CAs; each workload's chain ends in its own root
    (from meshConfig.caCertificates) and does not verify to the other one."""
    domain = signer_domain()
    roots = {team: ca_dir(tmp_path / team) for team in ("team-a", "team-b")}
    issuers = tmp_path / "signer-issuers.toml"
    issuers.write_text(
        "".join(f'["{domain}/{team}"]\nissuer = "local"\nlocal-ca-dir = "{tmp_path / team}"\n' for team in roots)
    )
    ca_dir(tmp_path / "default-ca")
    args = [f"--local-ca-dir={tmp_path / 'default-ca'}", f"--k8s-signer-issuers-file={issuers}"]
    with running_signer(kube, tmp_path, [f"{domain}/*"], args) as csr_service:
        results = {
            team: result
            for (team, _), result in cert_signer_requests(
                kube, istio_client, tmp_path, domain=domain, roots=roots
            ).items()
        }
        metrics = csr_service.metrics()
        log = csr_service.log()

    for team, (res, spiffe) in results.items():
        assert res.ok, f"{team}: {res.code}: {res.message}\n{log[-3000:]}"
        assert pki.spiffe_uris(res.leaf) == [spiffe]
        certs = res.certificates
        assert certs[-1] == roots[team]
        assert certs.count(roots[team]) == 1
        pki.verify_chain(res.leaf, certs[1:-1], [roots[team]])
        other = roots["team-b" if team == "team-a" else "team-a"]
        with pytest.raises(VerificationError):
            pki.verify_chain(res.leaf, certs[1:-1], [other])
        assert f'csr_service_k8s_signer_csrs_total{{result="signed",signer="{domain}/{team}"}} 1.0' in metrics
