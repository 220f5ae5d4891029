"""JWT authentication: verify a projected service-account token against a JWKS.

Checks, in order: an asymmetric ``alg`` we allow (never ``none``, never HMAC — an HMAC
"verified" with a public key is the classic JWT forgery); a key from the key set whose type
matches the alg; the signature; ``exp``/``nbf``/``iat`` with a small leeway; an audience
from the configured list; the issuer if configured; a ``sub`` of the form
``system:serviceaccount:<ns>:<sa>``. The SPIFFE identity is built from ``sub``.

Trade-off (documented for operators): a JWT is checked offline, so a token of a deleted pod
or service account stays valid until it expires. The TokenReview authenticator asks the
apiserver instead.

Verified tokens are remembered (:class:`VerifiedTokens`): istio-agent presents the same token
for every request until the kubelet rotates it, and a full check costs ~50 µs of a request's
~1 ms (RS256 verify, two JSON decodes, the claims). An entry is keyed by the token's SHA-256,
answers only while ``now < exp`` (never past exp, not even by the leeway a fresh check
allows), and only while the key set still returns the very key object that verified it (a
JWKS refresh or a key removed ends it) and, for ``jwks``, the discovered issuer is the same.
The audiences, the issuer and the trust domain are fixed for an authenticator's life, so a
remembered answer is the answer a fresh check would give now. Refusals are never remembered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from jwt import PyJWK, PyJWKSet

from csr_service.common.errors import AuthenticationError, ConfigError
from csr_service.common.identity import SpiffeId, service_account_from_username
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.settings import JWTSettings
from csr_service.plugins.authenticator import Caller

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = ["ALLOWED_ALGORITHMS", "JWTAuthenticator", "KeySource", "StaticKeySource", "decode_segment", "numeric_date"]

#: Asymmetric algorithms only. Maps alg → the JWK key type it needs.
ALLOWED_ALGORITHMS: Mapping[str, str] = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
_EC_CURVE_FOR_ALG = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
#: A projected token is ~1 KiB; anything this big is not one.
MAX_TOKEN_BYTES = 16 * 1024


class KeySource(Protocol):
    """Where verification keys come from (a file today; the apiserver's JWKS later)."""

    async def get(self, kid: str | None) -> PyJWK | None:
        """The key with this ``kid`` (or the only key when ``kid`` is None), else None."""
        ...


class StaticKeySource:
    """Keys from a JWKS document loaded once (file or dict)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        try:
            self._set = PyJWKSet.from_dict(dict(jwks))
        except (jwt.PyJWKSetError, jwt.InvalidKeyError, KeyError, TypeError) as exc:
            raise ConfigError(f"--jwt-jwks-file: not a usable JWKS: {exc}") from exc
        self._by_kid = {k.key_id: k for k in self._set.keys if k.key_id}

    @classmethod
    def from_file(cls, path: str) -> StaticKeySource:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--jwt-jwks-file: cannot read {path}: {exc}") from exc
        return cls(data)

    async def get(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._by_kid.get(kid)
        return self._set.keys[0] if len(self._set.keys) == 1 else None


#: What every service-account token has; a token without one of these is refused.
_REQUIRED_CLAIMS = ("exp", "iat", "sub", "aud")
#: The largest NumericDate we accept: 9999-12-31T23:59:59Z, the end of what datetime represents.
MAX_NUMERIC_DATE = 253402300799


def numeric_date(value: Any) -> float | None:
    """A JWT NumericDate (RFC 7519 §2) as a float, or None unless it is a sane one.

    Sane: a JSON number (not a boolean, not null), finite, and between the epoch and the year
    9999. NaN compares false with everything, so an unchecked NaN ``exp`` would make a token
    valid forever; ±Infinity and 10^30 break date conversions further down.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    # The range check comes before float(): JSON numbers have no size limit, json reads 10^400
    # as an int, and float() of it raises OverflowError. NaN fails the comparison too.
    if not 0 <= value <= MAX_NUMERIC_DATE:
        return None
    return float(value)


_ALGORITHMS = {alg: jwt.get_algorithm_by_name(alg) for alg in ALLOWED_ALGORITHMS}


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def decode_segment(segment: str) -> Any:
    """One base64url segment of a JWT decoded as JSON; ValueError if it is not one.

    The segment is the client's, so RecursionError becomes ValueError too: json.loads recurses
    once per nesting level, and ``[[[…`` a thousand levels deep (2 KB, far below
    :data:`MAX_TOKEN_BYTES`) exhausts the interpreter's recursion limit.
    """
    try:
        return json.loads(_b64decode(segment))
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        value = decode_segment(segment)
    except ValueError as exc:  # binascii.Error and JSONDecodeError included
        raise _fail("malformed token", f"malformed token {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise _fail("malformed token", f"token {what} is not a JSON object")
    return value


@dataclass(frozen=True, slots=True)
class _Header:
    alg: str
    kid: str | None


def _fail(public: str, detail: str | None = None) -> AuthenticationError:
    return AuthenticationError(f"authentication failed: {public}", detail=detail or public)


#: Verified tokens remembered per authenticator: a replica's pods each hold one token (two
#: around a rotation), so this covers ~4,000 pods per worker; beyond it the least recently used
#: entry goes and that token is simply checked in full again. ~0.5 KiB per entry.
VERIFIED_TOKENS_MAX = 8192


@dataclass(frozen=True, slots=True)
class _Verified:
    caller: Caller
    #: The token's exp: the entry answers only before it.
    exp: float
    kid: str | None
    #: The key object that verified the signature; the entry answers only while the key source
    #: returns this same object for ``kid``.
    key: PyJWK
    #: Whatever else the verdict depended on that can change (see _cache_context).
    context: Hashable


class VerifiedTokens:
    """A bounded LRU of verified tokens: SHA-256 of the token → the verdict and what it rests on."""

    def __init__(self, size: int = VERIFIED_TOKENS_MAX) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes) -> _Verified | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def forget(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def remember(self, digest: bytes, entry: _Verified) -> None:
        if self.size <= 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class JWTAuthenticator:
    """Authenticates callers by their service-account JWT (see module docstring)."""

    name = "jwt"

    def __init__(
        self,
        keys: KeySource,
        *,
        trust_domain: str,
        audiences: Sequence[str] = ("istio-ca",),
        issuer: str | None = None,
        leeway: timedelta = timedelta(seconds=30),
        cache_size: int = VERIFIED_TOKENS_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._trust_domain = trust_domain
        # A tuple: remembered verdicts rely on the audiences never changing (module docstring).
        self._audiences = tuple(audiences)
        self._issuer = issuer
        self._leeway = leeway
        self._verified = VerifiedTokens(cache_size)

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) of the verified-token cache, for the metrics."""
        return self._verified.hits, self._verified.misses

    def recognizes(self, ctx: RequestContext) -> bool:
        """A bearer token is present (see ``--authenticators``)."""
        return ctx.bearer_token() is not None

    async def authenticate(self, ctx: RequestContext) -> Caller:
        token = ctx.bearer_token()
        if token is None:
            raise _fail("no bearer token in the authorization metadata")
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail("token too large")
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is not None:
            # The same verdict only while nothing it rests on has changed (module docstring).
            if (
                self._clock() < known.exp
                and await self._keys.get(known.kid) is known.key
                and self._cache_context() == known.context
            ):
                self._verified.hits += 1
                return known.caller
            self._verified.forget(digest)
        self._verified.misses += 1
        header = self._header(token)
        key = await self._keys.get(header.kid)
        if key is None:
            raise _fail("token signed by an unknown key", f"no verification key with kid={header.kid!r}")
        self._check_key_matches(header.alg, key)
        context = self._cache_context()  # read before the checks that depend on it
        claims = self._verify(token, key, header.alg)  # ~0.03-0.07 ms: inline (see csr_service.infra.cpu)
        self._check_claims(claims)
        caller = self._caller(claims)
        exp = numeric_date(claims["exp"])  # _check_claims has made sure it is one
        if exp is not None:
            self._verified.remember(digest, _Verified(caller, exp, header.kid, key, context))
        return caller

    def _cache_context(self) -> Hashable:
        """What a verdict depends on besides the token, the key and the clock, if it can change
        during this authenticator's life (a subclass's discovered issuer); compared with ==."""
        return None

    @staticmethod
    def _header(token: str) -> _Header:
        parts = token.split(".")
        # An empty signature is well-formed (alg "none"); it is refused for its alg, below.
        if len(parts) != 3 or not (_B64URL.fullmatch(parts[0]) and _B64URL.fullmatch(parts[1])):
            raise _fail("malformed token", "token is not three base64url segments")
        if parts[2] and not _B64URL.fullmatch(parts[2]):
            raise _fail("malformed token", "token is not three base64url segments")
        header = _json_segment(parts[0], "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise _fail("token algorithm not allowed", f"token alg {str(alg)[:20]!r} is not an allowed algorithm")
        if "crit" in header or "b64" in header:
            # RFC 7515 §4.1.11: a verifier that does not understand a critical extension
            # (RFC 7797's unencoded payload is the only one defined) must reject the token.
            raise _fail("malformed token", "token header has critical extensions (crit/b64), which are not supported")
        kid = header.get("kid")
        return _Header(alg=alg, kid=kid if isinstance(kid, str) else None)

    @staticmethod
    def _check_key_matches(alg: str, key: PyJWK) -> None:
        kty = key.key_type
        if kty != ALLOWED_ALGORITHMS[alg]:
            raise _fail("token algorithm does not match its key", f"alg {alg} with a {kty} key")
        if kty == "EC":
            curve = getattr(key, "_jwk_data", {}).get("crv")
            if curve is not None and curve != _EC_CURVE_FOR_ALG[alg]:
                raise _fail("token algorithm does not match its key", f"alg {alg} with curve {curve}")

    @staticmethod
    def _verify(token: str, key: PyJWK, alg: str) -> dict[str, Any]:
        """Check the signature with PyJWT's algorithm for ``alg``; return the claims.

        Not ``jwt.decode``: it re-parses the header and validates the base64 alphabet one
        character at a time (~35 µs per Kubernetes token, a third of all JWT work), all of
        which ``_header`` has already done with one regex. The signature check itself is
        PyJWT's (raw-to-DER conversion for ECDSA, padding for RSA-PSS, ...), with ``alg``
        already pinned to the key's type by ``_check_key_matches``.
        """
        signing_input, _, signature_b64 = token.rpartition(".")
        try:
            signature = _b64decode(signature_b64)
        except (ValueError, binascii.Error) as exc:
            raise _fail("malformed token", f"malformed token signature: {exc}") from exc
        try:
            valid = _ALGORITHMS[alg].verify(signing_input.encode("ascii"), key.key, signature)
        except Exception:  # noqa: BLE001 - a signature that cannot be checked is not valid
            valid = False
        if not valid:
            raise _fail("token signature invalid")
        return _json_segment(signing_input.partition(".")[2], "payload")

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        """exp/nbf/iat with the leeway, the audience list, the issuer: PyJWT's semantics."""
        for name in _REQUIRED_CLAIMS:
            if name not in claims:
                raise _fail(f"token lacks the {name} claim")
        now = self._clock()
        leeway = self._leeway.total_seconds()
        times: dict[str, float] = {}
        for name in ("exp", "iat", "nbf"):
            if name in claims:  # present means valid: a null nbf is as wrong as a null exp
                value = numeric_date(claims[name])
                if value is None:
                    raise _fail("invalid token", f"invalid token: the {name} claim is not a valid NumericDate")
                times[name] = value
        exp, iat, nbf = times["exp"], times["iat"], times.get("nbf")
        if exp <= now - leeway:
            raise _fail("token expired")
        if iat > now + leeway:
            raise _fail("token not yet valid", "token not yet valid: issued in the future (iat)")
        if nbf is not None and nbf > now + leeway:
            raise _fail("token not yet valid", "token not yet valid (nbf)")
        aud = claims["aud"]
        token_auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(token_auds, list) or not all(isinstance(a, str) for a in token_auds):
            raise _fail("invalid token", "invalid token: the aud claim is not a string or a list of strings")
        if not any(a in self._audiences for a in token_auds):
            raise _fail("token audience not accepted", f"token audience {token_auds[:5]} not in {self._audiences}")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise _fail("token issuer not accepted", f"token iss is not {self._issuer!r}")

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        sub = claims.get("sub")
        try:
            ns, sa = service_account_from_username(sub if isinstance(sub, str) else "")
        except ValueError as exc:
            raise _fail("token is not a Kubernetes service-account token", f"sub {str(sub)[:100]!r}: {exc}") from exc
        pod_name = pod_uid = None
        k8s = claims.get("kubernetes.io")
        if isinstance(k8s, Mapping):
            if k8s.get("namespace", ns) != ns:
                raise _fail("token claims disagree", "kubernetes.io.namespace differs from sub")
            pod = k8s.get("pod")
            if isinstance(pod, Mapping):
                pod_name, pod_uid = pod.get("name"), pod.get("uid")
        exp = numeric_date(claims.get("exp"))  # _check_claims has made sure it is one
        return Caller(
            identity=SpiffeId(self._trust_domain, ns, sa),
            pod_name=pod_name if isinstance(pod_name, str) else None,
            pod_uid=pod_uid if isinstance(pod_uid, str) else None,
            token_expires_at=datetime.fromtimestamp(exp, UTC) if exp is not None else None,
            authenticator=self.name,
        )


def create(values: Mapping[str, Any], runtime: Runtime) -> JWTAuthenticator:
    """``--authenticator jwt``: keys from ``--jwt-jwks-file``."""
    settings = JWTSettings.from_values(values)
    if not settings.jwks_file:
        raise ConfigError("--jwt-jwks-file: required with --authenticator jwt (or use --dev)")
    return JWTAuthenticator(
        StaticKeySource.from_file(settings.jwks_file),
        trust_domain=runtime.trust_domain,
        audiences=settings.audiences,
        issuer=settings.issuer,
        leeway=settings.leeway,
    )
