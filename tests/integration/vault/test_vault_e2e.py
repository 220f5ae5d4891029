"""csr-service (a subprocess) with ``--issuer vault``: the Istio client gets a Vault-signed
certificate, and an OpenBao outage is UNAVAILABLE then heals without restarting csr-service."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.integration.vault.conftest import (
    MESH_ROLE,
    TEST_POLICY,
    TEST_POLICY_HCL,
    RestartableOpenBao,
    VaultEnv,
)
from tests.support import pki
from tests.support.certs import csr_pem, forge_signature, uri_sans
from tests.support.dev_server import DevServer, free_port, metric_sample, running_server
from tests.support.pki import load_certs, new_key
from tests.support.waiting import wait_for
from tests.testbed.openbao import POLICY

pytestmark = pytest.mark.vault

IDENTITY = "spiffe://cluster.local/ns/default/sa/sleep"


def vault_flags(values: Mapping[str, Any]) -> list[str]:
    """``vault-*`` option values as command-line flags."""
    args = []
    for name, value in values.items():
        if not name.startswith("vault-"):
            continue
        if isinstance(value, timedelta):
            text = f"{int(value.total_seconds())}s"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, tuple):
            text = ",".join(value)
        else:
            text = str(value)
        args += [f"--{name}", text]
    return args


@contextmanager
def vault_server(
    tmp: Path, root_pem: str, values: Mapping[str, Any], *, http_port: int | None = None
) -> Iterator[DevServer]:
    """``csr-service serve --dev --issuer vault`` trusting ``root_pem`` (Vault's root); its
    HTTP side (/metrics) on ``http_port`` when given."""
    root_file = tmp / "vault-root.pem"
    root_file.write_text(root_pem)
    state = tmp / "state"
    port = free_port()
    args = ["--dev", "--state-dir", str(state), "--issuer", "vault", "--root-ca-file", str(root_file)]
    args += ["--grpc-listen", f"127.0.0.1:{port}", "--workers", "1"]
    args += ["--serving-dns-names", "localhost", "--serving-ip-addresses", "127.0.0.1", *vault_flags(values)]
    env = {"CSR_SERVICE_HTTP_LISTEN": f"127.0.0.1:{http_port}"} if http_port else None
    with running_server(
        args, root_cert=root_file, state_dir=state, log_path=tmp / "server.log", port=port, env=env
    ) as srv:
        yield srv


def create_certificate(
    srv: DevServer, timeout: float = 20, pem: bytes | None = None
) -> ca_pb2.IstioCertificateResponse:
    pem = pem or csr_pem(new_key(), uris=(IDENTITY,))
    req = ca_pb2.IstioCertificateRequest(csr=pem.decode(), validity_duration=1800)
    md = [("authorization", f"Bearer {srv.token('default', 'sleep')}")]
    with srv.channel() as ch:
        return ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(req, metadata=md, timeout=timeout)


@pytest.mark.istio
def test_istio_client_gets_a_certificate_signed_by_vault(
    vault_env: VaultEnv, istio_client: Any, tmp_path: Path
) -> None:
    mount = vault_env.bao.mounts["pki_int"]
    values = vault_env.issuer_values(
        tmp_path / "creds", auth="approle", mount="pki_int", role="spiffe", **{"vault-serving-role": "mesh"}
    )
    # The serving role lives on pki_int too: same CA for our TLS and for workloads.
    vault_env.root.write_data("pki_int/roles/mesh", data=MESH_ROLE)
    with vault_server(tmp_path, mount.root_pem, values) as srv:
        res = istio_client(
            ca_address=srv.address,
            root_cert=srv.root_cert,
            token=srv.token("default", "sleep"),
            namespace="default",
            service_account="sleep",
        )
        assert res.ok, f"{res.code}: {res.message}\n{res.stderr[-2000:]}\n{srv.log()[-3000:]}"
    certs = res.certificates
    assert uri_sans(certs[0]) == [IDENTITY]
    intermediate = x509.load_pem_x509_certificate(mount.issuing_ca_pem.encode())
    root = x509.load_pem_x509_certificate(mount.root_pem.encode())
    assert certs[0].issuer == intermediate.subject, "signed by Vault's intermediate"
    pki.verify_chain(certs[0], certs[1:], [root])


@pytest.mark.timeout(240)
def test_openbao_outage_is_unavailable_and_heals_without_restart(
    restartable_openbao: RestartableOpenBao, tmp_path: Path
) -> None:
    bao = restartable_openbao
    c = bao.client()
    c.write_data("pki/roles/mesh", data=MESH_ROLE)
    c.sys.create_or_update_policy(TEST_POLICY, TEST_POLICY_HCL)
    token = c.auth.token.create(policies=[POLICY, TEST_POLICY], ttl="1h")["auth"]["client_token"]
    (tmp_path / "token").write_text(token)
    values = {
        "vault-address": bao.address,
        "vault-token-file": str(tmp_path / "token"),
        "vault-role": "spiffe",
        "vault-serving-role": "mesh",
        "vault-timeout": timedelta(seconds=2),
    }
    root_pem = c.read("pki/cert/ca")["data"]["certificate"]
    with vault_server(tmp_path, root_pem, values) as srv:
        assert load_certs(create_certificate(srv).cert_chain[0].encode())

        bao.stop()
        with pytest.raises(grpc.RpcError) as down:
            create_certificate(srv)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE

        bao.start(unseal=False)
        with pytest.raises(grpc.RpcError) as sealed:
            create_certificate(srv)
        assert sealed.value.code() == grpc.StatusCode.UNAVAILABLE

        bao.unseal()

        def issued() -> ca_pb2.IstioCertificateResponse | None:
            try:
                return create_certificate(srv)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # anything else is a failure, not "not yet"
                    raise
                return None

        resp = wait_for(issued, timeout=60, interval=0.5, what="a certificate after the unseal")
        assert uri_sans(load_certs(resp.cert_chain[0].encode())[0]) == [IDENTITY]
        assert srv.proc.poll() is None, "csr-service kept running throughout"
        assert token not in srv.log(), "the Vault token must never be logged"


def test_trust_roots_from_vault_pinned_by_fingerprint(vault_env: VaultEnv, tmp_path: Path) -> None:
    """No --root-ca-file: --trust-roots-from-issuer + --vault-roots-from-vault, pinned."""
    root_pem = vault_env.bao.mounts["pki"].root_pem
    root = x509.load_pem_x509_certificate(root_pem.encode())
    (tmp_path / "vault-root.pem").write_text(root_pem)  # what the test client trusts, not the server
    values = vault_env.issuer_values(
        tmp_path / "creds",
        role="spiffe",
        **{
            "vault-serving-role": "mesh",
            "vault-roots-from-vault": True,
            "vault-root-fingerprints": (pki.fingerprint(root),),
        },
    )
    state = tmp_path / "state"
    port = free_port()
    args = ["--dev", "--state-dir", str(state), "--issuer", "vault", "--trust-roots-from-issuer"]
    args += ["--grpc-listen", f"127.0.0.1:{port}", "--workers", "1"]
    args += ["--serving-dns-names", "localhost", "--serving-ip-addresses", "127.0.0.1", *vault_flags(values)]
    with running_server(
        args, root_cert=tmp_path / "vault-root.pem", state_dir=state, log_path=tmp_path / "server.log", port=port
    ) as srv:
        resp = create_certificate(srv)
        log = srv.log()
    chain = [c for pem in resp.cert_chain for c in load_certs(pem.encode())]
    assert chain[-1] == root
    assert "trust on first use" in log or "pinned by fingerprint" in log


@pytest.mark.parametrize("verbatim", [False, True], ids=["sign", "sign-verbatim"])
def test_forged_csr_is_refused_by_openbao_and_reported_as_invalid(
    vault_env: VaultEnv, tmp_path: Path, verbatim: bool
) -> None:
    """csr-service leaves the CSR's proof of possession to Vault (issuers.base, item 7): OpenBao
    must refuse a forged CSR on both sign paths, and the workload must still hear that its
    CSR is invalid, not that the Vault role is misconfigured."""
    values = vault_env.issuer_values(
        tmp_path / "creds", role="spiffe", **{"vault-serving-role": "mesh", "vault-sign-verbatim": verbatim}
    )
    http_port = free_port()
    with vault_server(tmp_path, vault_env.bao.mounts["pki"].root_pem, values, http_port=http_port) as srv:
        for key_kind in ("ec256", "rsa"):
            forged = forge_signature(csr_pem(new_key(key_kind), uris=(IDENTITY,)))
            with pytest.raises(grpc.RpcError) as refused:
                create_certificate(srv, pem=forged)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid CSR: signature does not verify" in (refused.value.details() or "")
        assert uri_sans(load_certs(create_certificate(srv).cert_chain[0].encode())[0]) == [IDENTITY]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        log = srv.log()
    # Counted as istiod counts a bad CSR, not as a CA that is not ready (what operators alert on).
    assert metric_sample(metrics, 'citadel_server_csr_sign_err_count{error="CSR_ERROR"}') == 2
    assert 'error="CA_NOT_READY"' not in metrics
    assert "the backend refused it too" in log, log[-3000:]
    assert "request signature invalid" in log, log[-3000:]  # OpenBao's own words, in the detail
