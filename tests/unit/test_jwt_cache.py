"""The JWT authenticators' verified-token cache never answers differently from a full check.

What a remembered verdict rests on can change: the clock passes ``exp``, the key set drops or
replaces the key, a ``jwks`` authenticator's discovered issuer moves. Each case is checked
alone, then all of them at random against an authenticator without a cache.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt import PyJWK

from csr_service.common.errors import AuthenticationError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwks import JWKSAuthenticator
from csr_service.pipeline.authn.jwt import JWTAuthenticator
from csr_service.plugins.authenticator import Caller

ISS = "https://kubernetes.default.svc"
SIGNERS = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("a", "b")}
NOW = 2_000_000_000.0


def _jwk(signer: str, kid: str = "k1") -> PyJWK:
    data: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(SIGNERS[signer].public_key()))
    data.update(kid=kid, alg="ES256", use="sig")
    return PyJWK.from_dict(data)


def _token(exp: float = NOW + 600, signer: str = "a", kid: str = "k1", iss: str = ISS) -> str:
    claims = {
        "iss": iss,
        "sub": "system:serviceaccount:default:sleep",
        "aud": ["istio-ca"],
        "iat": int(NOW) - 10,
        "exp": int(exp),
    }
    return jwt.encode(claims, SIGNERS[signer], algorithm="ES256", headers={"kid": kid})


class Keys:
    """An in-memory key source whose keys the test replaces (a JWKS refresh builds new objects)."""

    def __init__(self) -> None:
        self.by_kid: dict[str, PyJWK] = {"k1": _jwk("a")}
        self.issuer = ISS  # read by JWKSAuthenticator as the discovered issuer

    async def get(self, kid: str | None) -> PyJWK | None:
        return self.by_kid.get(kid or "")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def _auth(authn: JWTAuthenticator, token: str) -> Caller:
    return asyncio.run(authn.authenticate(RequestContext(metadata={"authorization": f"Bearer {token}"})))


def _outcome(authn: JWTAuthenticator, token: str) -> str:
    try:
        return _auth(authn, token).identity.uri
    except AuthenticationError as exc:
        return f"refused: {exc.public}"


def _jwt(keys: Keys, clock: Clock, **kw: Any) -> JWTAuthenticator:
    return JWTAuthenticator(keys, trust_domain="cluster.local", issuer=ISS, clock=clock, **kw)


def _jwks(keys: Keys, clock: Clock, **kw: Any) -> JWTAuthenticator:
    return JWKSAuthenticator(keys, trust_domain="cluster.local", clock=clock, **kw)  # type: ignore[arg-type]  # in-memory source


def test_a_repeated_token_is_answered_from_the_cache() -> None:
    authn = _jwt(Keys(), Clock())
    token = _token()  # ECDSA signatures are randomized: every _token() is another token
    first = _auth(authn, token)
    assert _auth(authn, token) is first
    assert authn.cache_stats() == (1, 1)


def test_never_past_exp_not_even_within_the_leeway() -> None:
    clock = Clock()
    authn = _jwt(Keys(), clock)  # 30 s leeway: a full check still accepts 10 s past exp
    token = _token(exp=NOW + 60)
    _auth(authn, token)
    clock.now = NOW + 70
    _auth(authn, token)
    assert authn.cache_stats() == (0, 2)  # the second answer came from a full check
    strict = _jwt(Keys(), clock, leeway=timedelta(0))
    clock.now = NOW
    _auth(strict, token)
    clock.now = NOW + 60
    with pytest.raises(AuthenticationError, match="expired"):
        _auth(strict, token)


def test_a_removed_key_ends_the_verdict() -> None:
    keys = Keys()
    authn = _jwt(keys, Clock())
    token = _token()
    _auth(authn, token)
    del keys.by_kid["k1"]
    with pytest.raises(AuthenticationError, match="no verification key"):
        _auth(authn, token)


def test_a_replaced_key_ends_the_verdict() -> None:
    keys = Keys()
    authn = _jwt(keys, Clock())
    token = _token()
    _auth(authn, token)
    keys.by_kid["k1"] = _jwk("b")  # same kid, another key: the token no longer verifies
    with pytest.raises(AuthenticationError, match="signature"):
        _auth(authn, token)
    keys.by_kid["k1"] = _jwk("a")  # the same key again, as a refresh would rebuild it: a full check
    _auth(authn, token)
    assert authn.cache_stats() == (0, 3)


def test_a_changed_discovered_issuer_ends_the_verdict() -> None:
    keys = Keys()
    authn = _jwks(keys, Clock())
    token = _token()
    _auth(authn, token)
    keys.issuer = "https://other.example"  # the key objects stay: only the context differs
    with pytest.raises(AuthenticationError, match="token iss"):
        _auth(authn, token)


def test_refusals_are_not_remembered() -> None:
    authn = _jwt(Keys(), Clock())
    forged = _token(signer="b")
    for _ in range(2):
        with pytest.raises(AuthenticationError, match="signature"):
            _auth(authn, forged)
    assert authn.cache_stats() == (0, 2)


def test_the_cache_is_bounded_and_can_be_off() -> None:
    authn = _jwt(Keys(), Clock(), cache_size=2)
    tokens = [_token(exp=NOW + 600 + i) for i in range(3)]
    for token in tokens:
        _auth(authn, token)
    assert len(authn._verified) == 2
    _auth(authn, tokens[0])  # the least recently used one went
    assert authn.cache_stats() == (0, 4)
    off = _jwt(Keys(), Clock(), cache_size=0)
    _auth(off, tokens[0])
    _auth(off, tokens[0])
    assert off.cache_stats() == (0, 2)


EVENTS = st.sampled_from(["tick", "expire", "remove", "replace", "restore", "issuer", "other-issuer"])


@settings(max_examples=60, deadline=None)
@given(events=st.lists(EVENTS, max_size=12), use_jwks=st.booleans())
def test_cached_and_uncached_answers_agree(events: list[str], use_jwks: bool) -> None:
    """Whatever happens between requests, the cache answers what a full check answers."""
    clock = Clock()
    keys = Keys()
    make = _jwks if use_jwks else _jwt
    cached, fresh = make(keys, clock), make(keys, clock, cache_size=0)
    token = _token(exp=NOW + 120)
    assert _outcome(cached, token) == _outcome(fresh, token)
    for event in events:
        if event == "tick":
            clock.now += 40
        elif event == "expire":
            clock.now = NOW + 125  # past exp, within the leeway
        elif event == "remove":
            keys.by_kid.pop("k1", None)
        elif event == "replace":
            keys.by_kid["k1"] = _jwk("b")
        elif event == "restore":
            keys.by_kid["k1"] = _jwk("a")
        elif event == "issuer":
            keys.issuer = ISS
        else:
            keys.issuer = "https://other.example"
        assert _outcome(cached, token) == _outcome(fresh, token), events
