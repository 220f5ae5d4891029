"""TLS to Vault: the CA bundle and the client certificate options, against an HTTPS OpenBao
that requires a client certificate."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from csr_service.common.errors import UnavailableError
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.vault.issuer import create
from tests.integration.vault.conftest import CONTEXT, RestartableOpenBao
from tests.support.certs import WORKLOAD, csr_pem, uri_sans
from tests.support.pki import new_key
from tests.testbed.openbao import POLICY

pytestmark = pytest.mark.vault


def _values(bao: RestartableOpenBao, tmp: Path, **kw: Any) -> dict[str, Any]:
    assert bao.tls is not None
    token = bao.client().auth.token.create(policies=[POLICY], ttl="1h")["auth"]["client_token"]
    (tmp / "token").write_text(token)
    return {
        "vault-address": bao.address,
        "vault-token-file": str(tmp / "token"),
        "vault-role": "spiffe",
        "vault-ca-bundle": str(bao.tls / "ca.crt"),
        "vault-client-cert": str(bao.tls / "client.crt"),
        "vault-client-key": str(bao.tls / "client.key"),
        "vault-timeout": timedelta(seconds=3),
        **kw,
    }


def _sign(values: dict[str, Any]) -> IssuedChain:
    pem = csr_pem(new_key())
    req = SigningRequest(csr=x509.load_pem_x509_csr(pem), csr_pem=pem, ttl=timedelta(minutes=30), uris=(WORKLOAD,))
    issuer = create(values, CONTEXT)

    async def main() -> IssuedChain:
        await issuer.start()
        try:
            return await issuer.sign(req)
        finally:
            await issuer.stop()

    return asyncio.run(main())


def test_ca_bundle_and_client_certificate(tls_openbao: RestartableOpenBao, tmp_path: Path) -> None:
    issued = _sign(_values(tls_openbao, tmp_path))
    assert uri_sans(issued.leaf) == [WORKLOAD]


def test_without_the_client_certificate_vault_is_unavailable(tls_openbao: RestartableOpenBao, tmp_path: Path) -> None:
    values = _values(tls_openbao, tmp_path, **{"vault-client-cert": "", "vault-client-key": ""})
    with pytest.raises(UnavailableError):
        _sign(values)


def test_an_untrusted_server_certificate_is_refused(tls_openbao: RestartableOpenBao, tmp_path: Path) -> None:
    assert tls_openbao.tls is not None
    other = tmp_path / "other-ca.crt"
    other.write_text((tls_openbao.tls / "client.crt").read_text())  # not the CA that signed the server
    with pytest.raises(UnavailableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        _sign(_values(tls_openbao, tmp_path, **{"vault-ca-bundle": str(other)}))
