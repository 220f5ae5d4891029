"""Per-workload signers reaching the other issuers: istiod → CSR → csr-service → OpenBao PKI
(Vault issuer) for ``ISTIO_META_CERT_SIGNER=team-vault`` and → a cert-manager CA Issuer for
``team-cm``, chosen per signer name by ``--k8s-signer-issuers-file``."""

from __future__ import annotations

from pathlib import Path

import kubernetes.client as k8s
import pytest

from tests.integration.istiod_signer.support import (
    ca_dir,
    cert_signer_requests,
    signer_domain,
)
from tests.support import pki
from tests.support.k8s_signer import grant_signer_rbac, running_signer
from tests.testbed.certmanager import CertManager
from tests.testbed.istio import IstioClient
from tests.testbed.kube import KubeCluster, unique_name
from tests.testbed.openbao import OpenBao

pytestmark = [pytest.mark.istiod, pytest.mark.istio, pytest.mark.kube, pytest.mark.vault, pytest.mark.certmanager]


def test_vault_and_cert_manager_behind_istiod(
    kube: KubeCluster, openbao: OpenBao, cert_manager: CertManager, istio_client: IstioClient, tmp_path: Path
) -> None:
    domain = signer_domain()
    vault_signer, cm_signer = f"{domain}/team-vault", f"{domain}/team-cm"
    mount = openbao.pki_intermediate
    vault_root = pki.load_certs(mount.root_pem)[0]
    cm_root = pki.load_certs(cert_manager.issuer_ca_pem)[0]
    (tmp_path / "vault-root.pem").write_text(mount.root_pem)
    (tmp_path / "cm-root.pem").write_text(cert_manager.issuer_ca_pem)
    token = openbao.client().auth.token.create(policies=[openbao.policy], ttl="1h")["auth"]["client_token"]
    (tmp_path / "vault-token").write_text(token)
    (tmp_path / "issuers.toml").write_text(
        f"""
["{vault_signer}"]
issuer = "vault"
vault-address = "{openbao.address}"
vault-token-file = "{tmp_path / "vault-token"}"
vault-mount = "{mount.path}"
vault-role = "{mount.role}"
root-ca-file = "{tmp_path / "vault-root.pem"}"

["{cm_signer}"]
issuer = "cert-manager"
certmanager-namespace = "{cert_manager.issuer_namespace}"
certmanager-issuer-name = "{cert_manager.issuer_name}"
certmanager-issuer-kind = "Issuer"
root-ca-file = "{tmp_path / "cm-root.pem"}"
"""
    )
    # The signer's ServiceAccount: the CSR signer's RBAC plus the cert-manager issuer's own
    # (CertificateRequests in the Issuer's namespace).
    ns = kube.create_namespace(unique_name("signer"))
    grant_signer_rbac(kube, ns, "csr-signer", [f"{domain}/*"])
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client)
    role = unique_name("csr-signer-crs")
    rbac.create_namespaced_role(
        cert_manager.issuer_namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name=role),
            rules=[
                k8s.V1PolicyRule(
                    api_groups=["cert-manager.io"],
                    resources=["certificaterequests"],
                    verbs=["get", "list", "watch", "create", "delete"],
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        cert_manager.issuer_namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name=role),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name=role),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="csr-signer", namespace=ns)],
        ),
    )
    ca_dir(tmp_path / "default-ca")
    args = [f"--local-ca-dir={tmp_path / 'default-ca'}", f"--k8s-signer-issuers-file={tmp_path / 'issuers.toml'}"]
    roots = {"team-vault": vault_root, "team-cm": cm_root}
    with running_signer(kube, tmp_path, [f"{domain}/*"], args, namespace=ns, rbac=False) as csr_service:
        results = cert_signer_requests(
            kube, istio_client, tmp_path, domain=domain, roots=roots, key_types=("rsa", "ec256")
        )
        log = csr_service.log()

    for (team, key), (res, spiffe) in results.items():
        assert res.ok, f"{team}/{key}: {res.code}: {res.message}\n{log[-4000:]}"
        assert pki.spiffe_uris(res.leaf) == [spiffe]
        certs = res.certificates
        assert certs[-1] == roots[team]
        assert certs.count(roots[team]) == 1  # the signer wrote no root; istiod appended it once
        pki.verify_chain(res.leaf, certs[1:-1], [roots[team]])
    assert f"({vault_signer})" in log
    assert f"({cm_signer})" in log
