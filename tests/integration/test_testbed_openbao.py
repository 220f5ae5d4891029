"""The test-bed OpenBao is real: its PKI role signs SPIFFE-only CSRs and refuses anything else."""

from __future__ import annotations

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support import pki
from tests.testbed.kube import KubeCluster
from tests.testbed.openbao import OpenBao, OpenBaoKubeAuth, PkiMount

IDENTITY = "spiffe://cluster.local/ns/foo/sa/bar"


def _sign(client: hvac.Client, mount: PkiMount, csr: bytes) -> dict[str, object]:
    # The request BACKENDS.md prescribes for csr-service's Vault issuer.
    resp = client.write_data(
        f"{mount.path}/sign/{mount.role}",
        data={"csr": csr.decode(), "common_name": "", "exclude_cn_from_sans": True, "ttl": "3600s"},
    )
    return dict(resp["data"])


@pytest.mark.vault
@pytest.mark.parametrize("which", ["pki_root", "pki_intermediate"])
@pytest.mark.parametrize("key_kind", ["rsa", "ec256", "ec384"])
def test_role_signs_spiffe_only_csr(openbao: OpenBao, which: str, key_kind: str) -> None:
    mount: PkiMount = getattr(openbao, which)
    csr, _ = pki.make_csr(IDENTITY, key_kind)

    data = _sign(openbao.client(), mount, csr)

    leaf = pki.load_certs(str(data["certificate"]))[0]
    assert pki.spiffe_uris(leaf) == [IDENTITY]
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    intermediates = [c for pem in mount.chain_pems for c in pki.load_certs(pem)]
    pki.verify_chain(leaf, intermediates, pki.load_certs(mount.root_pem))


@pytest.mark.vault
@pytest.mark.parametrize(
    ("uri", "common_name"),
    [
        ("spiffe://evil.example/ns/foo/sa/bar", None),  # other trust domain
        ("spiffe://cluster.local/foo/bar", None),  # not an ns/sa identity
        (IDENTITY, "bar.foo.svc"),  # a CN (and so a DNS name) is not allowed
    ],
)
def test_role_refuses_non_spiffe_csr(openbao: OpenBao, uri: str, common_name: str | None) -> None:
    csr, _ = pki.make_csr(uri, common_name=common_name)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        openbao.client().write_data(
            "pki/sign/spiffe", data={"csr": csr.decode(), "common_name": common_name or "", "ttl": "3600s"}
        )


@pytest.mark.vault
def test_approle_token_can_sign_but_not_administer(openbao: OpenBao) -> None:
    c = hvac.Client(url=openbao.address)
    login = c.auth.approle.login(role_id=openbao.approle_role_id, secret_id=openbao.new_approle_secret_id())
    assert openbao.policy in login["auth"]["policies"]

    csr, _ = pki.make_csr(IDENTITY)
    data = _sign(c, openbao.pki_intermediate, csr)
    assert pki.spiffe_uris(pki.load_certs(str(data["certificate"]))[0]) == [IDENTITY]
    with pytest.raises(hvac.exceptions.Forbidden):
        c.sys.enable_secrets_engine("pki", path="not-allowed")


@pytest.mark.vault
def test_wrong_approle_secret_is_refused(openbao: OpenBao) -> None:
    c = hvac.Client(url=openbao.address)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        c.auth.approle.login(role_id=openbao.approle_role_id, secret_id="00000000-0000-0000-0000-000000000000")


@pytest.mark.vault
@pytest.mark.kube
def test_kubernetes_auth_against_testbed_apiserver(
    openbao: OpenBao, openbao_kube_auth: OpenBaoKubeAuth, kube: KubeCluster
) -> None:
    auth = openbao_kube_auth
    jwt_ok = kube.token(auth.namespace, auth.service_account, audiences=[])
    c = hvac.Client(url=openbao.address)
    login = c.auth.kubernetes.login(role=auth.role, jwt=jwt_ok, mount_point=auth.mount)
    assert openbao.policy in login["auth"]["policies"]
    assert login["auth"]["metadata"]["service_account_namespace"] == auth.namespace
    csr, _ = pki.make_csr(IDENTITY)
    assert _sign(c, openbao.pki_root, csr)["certificate"]

    # Another service account is not bound to the role.
    kube.create_service_account(auth.namespace, "intruder")
    jwt_other = kube.token(auth.namespace, "intruder", audiences=[])
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=openbao.address).auth.kubernetes.login(role=auth.role, jwt=jwt_other, mount_point=auth.mount)
