"""JWT authenticator: a projected-token-shaped JWT passes; every bad token is UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from csr_service.common.errors import AuthenticationError, ConfigError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.jwt import JWTAuthenticator, StaticKeySource

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
ISS = "https://kubernetes.default.svc"


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.ECAlgorithm if alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
    d: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    d.update(kid=kid, alg=alg, use="sig")
    return d


JWKS = {"keys": [_jwk(EC_KEY, "ec1", "ES256"), _jwk(RSA_KEY, "rsa1", "RS256")]}


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "iss": ISS,
        "sub": "system:serviceaccount:default:sleep",
        "aud": ["istio-ca"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": "default", "pod": {"name": "sleep-1", "uid": "u-1"}},
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _token(claims: dict[str, Any] | None = None, key: Any = EC_KEY, alg: str = "ES256", kid: str | None = "ec1") -> str:
    headers = {"kid": kid} if kid else {}
    return jwt.encode(claims or _claims(), key, algorithm=alg, headers=headers)


def _auth(token: str | None, **kw: Any) -> Any:
    authn = JWTAuthenticator(StaticKeySource(JWKS), trust_domain="cluster.local", issuer=kw.pop("issuer", ISS), **kw)
    md = {"authorization": f"Bearer {token}"} if token is not None else {}
    return asyncio.run(authn.authenticate(RequestContext(metadata=md)))


def test_valid_token_maps_to_spiffe_identity() -> None:
    caller = _auth(_token())
    assert caller.identity.uri == "spiffe://cluster.local/ns/default/sa/sleep"
    assert caller.pod_name == "sleep-1"
    assert caller.pod_uid == "u-1"


def test_rsa_token_and_audience_list() -> None:
    caller = _auth(_token(_claims(aud=["other", "istio-ca"]), key=RSA_KEY, alg="RS256", kid="rsa1"))
    assert caller.identity.service_account == "sleep"


def test_custom_audiences() -> None:
    token = _token(_claims(aud=["my-mesh"]))
    assert _auth(token, audiences=["my-mesh"]).identity.namespace == "default"
    with pytest.raises(AuthenticationError, match="audience"):
        _auth(token)


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}."


def _hmac_with_public_key() -> str:
    # The classic forgery: sign HS256 with the server's *public* key as the HMAC secret.
    pub = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "ec1", "typ": "JWT"}
    import hashlib
    import hmac

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(_claims()).encode())}"
    sig = hmac.new(pub, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


BAD = {
    "missing": (None, "no bearer token"),
    "empty bearer": ("", "no bearer token"),
    "malformed": ("not.a.jwt", "malformed"),
    "garbage": ("@@@", "malformed"),
    "expired": (lambda: _token(_claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)), "expired"),
    "not yet valid": (lambda: _token(_claims(nbf=int(time.time()) + 3600)), "not yet valid"),
    "issued in the future": (lambda: _token(_claims(iat=int(time.time()) + 3600)), "not yet valid"),
    "wrong audience": (lambda: _token(_claims(aud=["kubernetes"])), "audience"),
    "wrong issuer": (lambda: _token(_claims(iss="https://evil")), "issuer"),
    "wrong signature": (lambda: _token(key=OTHER_KEY), "signature"),
    "alg none": (lambda: _unsigned({"alg": "none", "kid": "ec1"}, _claims()), "algorithm"),
    "HS256 with public key": (_hmac_with_public_key, "algorithm"),
    "unknown kid": (lambda: _token(kid="nope"), "unknown key"),
    "alg/key mismatch": (lambda: _token(key=RSA_KEY, alg="RS256", kid="ec1"), "does not match"),
    "no exp": (lambda: _token(_claims(exp=None)), "exp"),
    "not a service account": (lambda: _token(_claims(sub="alice")), "service-account"),
    "namespace mismatch": (
        lambda: _token(_claims(**{"kubernetes.io": {"namespace": "other"}})),
        "disagree",
    ),
    "huge": (lambda: "a" * 20000, "too large"),
    "no iat": (lambda: _token(_claims(iat=None)), "iat"),
    "no sub": (lambda: _token(_claims(sub=None)), "sub"),
    "no aud": (lambda: _token(_claims(aud=None)), "aud"),
    "exp not a number": (lambda: _token(_claims(exp="tomorrow")), "exp claim is not a valid NumericDate"),
    "exp a boolean": (lambda: _token(_claims(exp=True)), "exp claim is not a valid NumericDate"),
    # Numbers that are not sane dates: NaN compares false with everything (an unchecked NaN
    # exp never expires), and the others overflow datetime; json.dumps writes NaN/Infinity.
    **{
        f"{claim} {label}": (
            (lambda claim=claim, value=value: _resign(json.dumps(_claims(**{claim: value}) | {claim: value}).encode())),
            f"{claim} claim is not a valid NumericDate",
        )
        for claim in ("exp", "iat", "nbf")
        for label, value in (
            ("null", None),
            ("NaN", float("nan")),
            ("Infinity", float("inf")),
            ("-Infinity", float("-inf")),
            ("10^30", 1e30),
            ("in the year 10000", 253402300800),
            ("negative", -1),
            # Found by fuzzing: float() of it raised OverflowError out of authenticate.
            ("10^400, an integer no float can hold", 10**400),
        )
    },
    # Found by fuzzing: json.loads raised RecursionError out of authenticate.
    "payload nested deeper than the recursion limit": (lambda: _resign(b"[" * 5000 + b"]" * 5000), "malformed"),
    "header nested deeper than the recursion limit": (
        lambda: ".".join([_b64(b"[" * 5000 + b"]" * 5000), *_token().split(".")[1:]]),
        "malformed",
    ),
    "sub with a trailing newline": (
        lambda: _token(_claims(sub="system:serviceaccount:default:sleep\n")),
        "service-account",
    ),
    "namespace with a trailing newline": (
        lambda: _token(_claims(sub="system:serviceaccount:default\n:sleep")),
        "service-account",
    ),
    "aud a number": (lambda: _token(_claims(aud=7)), "aud claim"),
    "aud list with a number": (lambda: _token(_claims(aud=["x", 7])), "aud claim"),
    "missing iss when configured": (lambda: _token(_claims(iss=None)), "issuer"),
    "payload swapped after signing": (
        lambda: _swap_payload(_token(), _claims(sub="system:serviceaccount:kube-system:admin")),
        "signature",
    ),
    "signature of another length": (lambda: _token().rsplit(".", 1)[0] + ".AAAA", "signature"),
    "signature not base64": (lambda: _token().rsplit(".", 1)[0] + ".a*b", "malformed"),
    "payload not JSON": (lambda: _resign(b"not json"), "malformed"),
    "payload a JSON list": (lambda: _resign(b"[1, 2]"), "not a JSON object"),
    "crit header": (
        lambda: jwt.encode(_claims(), EC_KEY, algorithm="ES256", headers={"kid": "ec1", "crit": ["exp"]}),
        "critical",
    ),
    "four segments": (lambda: _token() + ".x", "malformed"),
}


def _swap_payload(token: str, claims: dict[str, Any]) -> str:
    header, _, sig = token.split(".")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{sig}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _resign(payload: bytes) -> str:
    """A correctly signed ES256 token whose payload is ``payload`` verbatim."""
    signed = jwt.api_jws.encode(payload, EC_KEY, algorithm="ES256", headers={"kid": "ec1"})
    return signed


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tokens_are_unauthenticated(case: str) -> None:
    token, fragment = BAD[case]
    with pytest.raises(AuthenticationError) as info:
        _auth(token() if callable(token) else token)
    assert fragment in info.value.public or fragment in info.value.detail


def test_non_bearer_scheme() -> None:
    authn = JWTAuthenticator(StaticKeySource(JWKS), trust_domain="cluster.local")
    with pytest.raises(AuthenticationError):
        asyncio.run(authn.authenticate(RequestContext(metadata={"authorization": f"Basic {_token()}"})))


def test_leeway_accepts_small_clock_differences() -> None:
    now = int(time.time())
    # 20 s past exp, iat/nbf 20 s ahead: inside the 30 s leeway, like PyJWT's.
    caller = _auth(_token(_claims(exp=now - 20, iat=now + 20, nbf=now + 20)))
    assert caller.identity.service_account == "sleep"
    with pytest.raises(AuthenticationError, match="expired"):
        _auth(_token(_claims(exp=now - 20, iat=now - 100)), leeway=timedelta(seconds=5))


def test_audience_may_be_a_single_string() -> None:
    assert _auth(_token(_claims(aud="istio-ca"))).identity.service_account == "sleep"


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
def test_other_rsa_algorithms_verify_with_the_same_key(alg: str) -> None:
    token = _token(key=RSA_KEY, alg=alg, kid="rsa1")
    assert _auth(token).identity.service_account == "sleep"


def test_issuer_not_checked_when_not_configured() -> None:
    assert _auth(_token(_claims(iss="anything")), issuer=None).identity.service_account == "sleep"


def test_bad_jwks_is_a_config_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="jwt-jwks-file"):
        StaticKeySource.from_file(str(tmp_path / "missing.json"))
