"""Dev mode's state directory: what a first start creates and what later starts reuse."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwt import JWTAuthenticator, StaticKeySource
from csr_service.service.dev import mint_dev_token, prepare_dev_state
from tests.support.pki import key_pem, new_key


def _authenticate(state_dir: Path, token: str) -> str:
    keys = StaticKeySource.from_file(str(state_dir / "jwks.json"))
    authn = JWTAuthenticator(keys, trust_domain="cluster.local")
    caller = asyncio.run(authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token}"})))
    return caller.identity.uri


def test_first_start_creates_an_rs256_key_like_kubernetes(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path)
    assert state.created
    assert stat.S_IMODE(state.jwt_key.stat().st_mode) == 0o600
    (jwk,) = json.loads(state.jwks.read_text())["keys"]
    assert (jwk["kty"], jwk["alg"]) == ("RSA", "RS256")
    token = mint_dev_token(tmp_path, namespace="default", service_account="sleep")
    assert _authenticate(tmp_path, token) == "spiffe://cluster.local/ns/default/sa/sleep"
    # A second start reuses the key: tokens minted before it still verify.
    again = prepare_dev_state(tmp_path)
    assert not again.created
    assert json.loads(again.jwks.read_text())["keys"][0]["kid"] == jwk["kid"]
    assert _authenticate(tmp_path, token).endswith("/sa/sleep")


def test_a_state_directory_with_an_older_ec_key_keeps_signing_es256(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "jwt-signing-key.pem").write_bytes(key_pem(new_key()))
    state = prepare_dev_state(tmp_path)
    (jwk,) = json.loads(state.jwks.read_text())["keys"]
    assert (jwk["kty"], jwk["alg"]) == ("EC", "ES256")
    token = mint_dev_token(tmp_path, namespace="ns1", service_account="app")
    assert _authenticate(tmp_path, token) == "spiffe://cluster.local/ns/ns1/sa/app"
