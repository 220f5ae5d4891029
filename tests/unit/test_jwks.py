"""JWKS authenticator with an in-memory discovery endpoint: issuer, rotation, refresh, rate limit."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from csr_service.common.errors import AuthenticationError, ConfigError, UnavailableError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwks import (
    Discovery,
    DiscoveryKeySource,
    JWKSAuthenticator,
    UrlFetcher,
)
from csr_service.plugins.authenticator import Caller
from tests.support.waiting import wait_for_async

ISS = "https://kubernetes.default.svc.cluster.local"
KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("old", "new")}


def jwks(*kids: str) -> dict[str, Any]:
    out = []
    for kid in kids:
        d: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEYS[kid].public_key()))
        d.update(kid=kid, alg="ES256", use="sig")
        out.append(d)
    return {"keys": out}


def token(kid: str = "old", iss: str = ISS, signer: str | None = None) -> str:
    now = int(time.time())
    claims = {
        "iss": iss,
        "sub": "system:serviceaccount:istio-system:ztunnel",
        "aud": ["istio-ca"],
        "iat": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": "istio-system", "pod": {"name": "ztunnel-1", "uid": "u-1"}},
    }
    return jwt.encode(claims, KEYS[signer or kid], algorithm="ES256", headers={"kid": kid})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFetcher:
    """Serves ``doc``/``keys``; ``fail`` makes every fetch raise UnavailableError."""

    def __init__(self, *kids: str, issuer: str = ISS) -> None:
        self.issuer = issuer
        self.keys: dict[str, Any] = jwks(*kids)
        self.fail = False
        self.fetches = 0

    async def discovery(self) -> Discovery:
        self.fetches += 1
        if self.fail:
            raise UnavailableError("down", detail="apiserver unreachable")
        return Discovery(issuer=self.issuer, jwks_uri=f"{self.issuer}/openid/v1/jwks")

    async def jwks(self, discovery: Discovery) -> Mapping[str, Any]:
        return self.keys


def make(fetcher: FakeFetcher, clock: Clock, issuer: str | None = None) -> JWKSAuthenticator:
    source = DiscoveryKeySource(fetcher, refresh_interval=timedelta(minutes=5), clock=clock)
    return JWKSAuthenticator(source, trust_domain="cluster.local", issuer=issuer)


def auth(authn: JWKSAuthenticator, tok: str) -> Caller:
    return asyncio.run(authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {tok}"})))


def test_token_verified_with_discovered_keys() -> None:
    authn = make(FakeFetcher("old"), Clock())
    caller = auth(authn, token())
    assert caller.identity.uri == "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
    assert (caller.pod_name, caller.pod_uid, caller.authenticator) == ("ztunnel-1", "u-1", "jwks")


def test_issuer_must_match_the_discovery_document() -> None:
    authn = make(FakeFetcher("old"), Clock())
    with pytest.raises(AuthenticationError, match="token iss"):
        auth(authn, token(iss="https://evil.example"))


def test_configured_issuer_overrides_discovery() -> None:
    authn = make(FakeFetcher("old"), Clock(), issuer="https://custom")
    assert auth(authn, token(iss="https://custom")).identity.service_account == "ztunnel"
    with pytest.raises(AuthenticationError, match="token iss"):
        auth(authn, token())


def test_wrong_signature_is_refused() -> None:
    authn = make(FakeFetcher("old"), Clock())
    with pytest.raises(AuthenticationError, match="signature"):
        auth(authn, token(kid="old", signer="new"))


def test_unknown_kid_refreshes_once_and_picks_up_a_rotated_key() -> None:
    clock, fetcher = Clock(), FakeFetcher("old")
    authn = make(fetcher, clock)
    auth(authn, token("old"))
    fetcher.keys = jwks("old", "new")  # the apiserver starts signing with a new key
    clock.now += 11  # past the minimum interval since the first fetch
    assert auth(authn, token("new")).identity.namespace == "istio-system"
    assert fetcher.fetches == 2


def test_a_flood_of_unknown_kids_is_rate_limited() -> None:
    clock, fetcher = Clock(), FakeFetcher("old")
    authn = make(fetcher, clock)
    auth(authn, token("old"))
    forged = jwt.encode(
        {"sub": "system:serviceaccount:a:b", "aud": ["istio-ca"], "exp": int(time.time()) + 60},
        KEYS["new"],
        algorithm="ES256",
        headers={"kid": "made-up"},
    )
    for _ in range(50):
        with pytest.raises(AuthenticationError, match="no verification key"):
            auth(authn, forged)
    assert fetcher.fetches == 1  # within the 10 s window: no fetch at all
    clock.now += 11
    for _ in range(50):
        with pytest.raises(AuthenticationError, match="no verification key"):
            auth(authn, forged)
    assert fetcher.fetches == 2  # one more per window


def test_stale_keys_are_refreshed_in_the_background() -> None:
    clock, fetcher = Clock(), FakeFetcher("old")
    source = DiscoveryKeySource(fetcher, refresh_interval=timedelta(minutes=5), clock=clock)
    authn = JWKSAuthenticator(source, trust_domain="cluster.local")

    async def go() -> None:
        await authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token()}"}))
        clock.now += 301
        fetcher.keys = jwks("new")  # "old" retired upstream
        # This request still uses the keys it has; the refresh runs alongside.
        await authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token()}"}))

        async def old_key_retired() -> bool:
            try:
                await authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token('old')}"}))
            except AuthenticationError:
                return True
            return False

        await wait_for_async(old_key_retired, timeout=5, what="the background refresh to retire key 'old'")

    asyncio.run(go())
    assert fetcher.fetches == 2
    with pytest.raises(AuthenticationError, match="no verification key"):
        auth(authn, token("old"))


def test_no_keys_yet_is_unavailable_and_retried_after_the_interval() -> None:
    clock, fetcher = Clock(), FakeFetcher("old")
    fetcher.fail = True
    authn = make(fetcher, clock)
    for _ in range(5):
        with pytest.raises(UnavailableError) as info:
            auth(authn, token())
        assert "apiserver unreachable" in info.value.detail
    assert fetcher.fetches == 1
    fetcher.fail = False
    clock.now += 11
    assert auth(authn, token()).identity.service_account == "ztunnel"


def test_failed_refresh_keeps_the_old_keys() -> None:
    clock, fetcher = Clock(), FakeFetcher("old")
    authn = make(fetcher, clock)
    auth(authn, token())
    fetcher.fail = True
    clock.now += 11
    with pytest.raises(AuthenticationError, match="no verification key"):
        auth(authn, token("new"))
    assert auth(authn, token("old")).identity.service_account == "ztunnel"


def test_unusable_key_set_is_unavailable() -> None:
    fetcher = FakeFetcher("old")
    fetcher.keys = {"keys": []}
    with pytest.raises(UnavailableError):
        auth(make(fetcher, Clock()), token())


@pytest.mark.parametrize("doc", [{}, {"issuer": ISS}, {"jwks_uri": "https://x/keys"}, {"issuer": 1, "jwks_uri": "x"}])
def test_discovery_document_needs_issuer_and_jwks_uri(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="issuer or jwks_uri"):
        Discovery.parse(doc)


def test_url_fetcher_requires_https() -> None:
    with pytest.raises(ConfigError, match="--jwks-url"):
        UrlFetcher("http://issuer.example")


def test_url_fetcher_refuses_a_plain_http_jwks_uri() -> None:
    fetcher = UrlFetcher("https://issuer.example")
    with pytest.raises(UnavailableError) as info:
        asyncio.run(fetcher.jwks(Discovery(issuer="https://issuer.example", jwks_uri="http://issuer.example/keys")))
    assert "not https" in info.value.detail
