"""JWKS authentication: verify service-account tokens offline with the apiserver's published keys.

``--authenticator jwks`` is :class:`~csr_service.pipeline.authn.jwt.JWTAuthenticator` (same
checks: allowed algorithms, signature, exp/nbf/iat, audience, ``sub``) with keys from OpenID
discovery instead of a file, and the issuer checked against the discovery document (or
``--jwt-issuer`` when set). No API call per request.

Where the keys come from:

- default: the apiserver of ``--kubeconfig`` / the in-cluster config, with its credentials. We
  read ``/.well-known/openid-configuration`` for the issuer and the apiserver's own
  ``/openid/v1/jwks`` for the keys. We do not follow ``jwks_uri`` here: it is built from the
  apiserver's external address or ``--service-account-jwks-uri`` (for outside consumers) and is
  often unreachable from a pod, while the apiserver we are connected to serves the same keys at
  that fixed path. Readable by every service account by default (ClusterRole
  ``system:service-account-issuer-discovery``), so no extra RBAC.
- ``--jwks-url``: any OIDC issuer; ``<url>/.well-known/openid-configuration`` → ``jwks_uri``
  (https only), verified with ``--jwks-ca-file`` or the system CAs.

Refresh: keys are re-read when older than ``--jwks-refresh-interval`` (in the background; the
request uses the current keys) and when a token names an unknown ``kid`` (key rotation), but at
most once per :data:`MIN_REFRESH_INTERVAL`, so a flood of tokens with made-up kids cannot turn
into a flood of apiserver requests. A failed refresh keeps the old keys; with no keys at all the
request gets UNAVAILABLE (retryable).

Trade-off: a token of a deleted pod or service account stays valid until it expires (Istio's
tokens live 12 h, refreshed by the kubelet). ``--authenticator tokenreview`` asks the apiserver
instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from jwt import PyJWK

from csr_service.common.errors import AuthenticationError, ConfigError, UnavailableError
from csr_service.pipeline.authn.jwt import VERIFIED_TOKENS_MAX, JWTAuthenticator, StaticKeySource
from csr_service.pipeline.authn.settings import JWKSSettings
from csr_service.plugins.authenticator import Caller

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = [
    "MIN_REFRESH_INTERVAL",
    "DiscoveryKeySource",
    "Fetcher",
    "JWKSAuthenticator",
    "KubeFetcher",
    "UrlFetcher",
    "create",
]

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
#: Where every apiserver serves its service-account verification keys.
APISERVER_JWKS_PATH = "/openid/v1/jwks"
#: The least time between two fetches triggered by requests (unknown kid, or no keys yet).
MIN_REFRESH_INTERVAL = timedelta(seconds=10)
#: Discovery documents and key sets are small; anything bigger is not one.
MAX_DOCUMENT_BYTES = 1024 * 1024
#: The apiserver answers 406 to a JWKS request that accepts only application/json.
ACCEPT = "application/json, application/jwk-set+json"


@dataclass(frozen=True, slots=True)
class Discovery:
    """What we use from an OpenID discovery document."""

    issuer: str
    jwks_uri: str

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> Discovery:
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        if not isinstance(issuer, str) or not issuer or not isinstance(jwks_uri, str) or not jwks_uri:
            raise ValueError("discovery document lacks issuer or jwks_uri")
        return cls(issuer=issuer, jwks_uri=jwks_uri)


class Fetcher(Protocol):
    """Reads the discovery document and the key set. Raises UnavailableError on any failure."""

    async def discovery(self) -> Discovery: ...

    async def jwks(self, discovery: Discovery) -> Mapping[str, Any]: ...


def _json_object(data: bytes, what: str) -> Mapping[str, Any]:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise UnavailableError("cannot load token verification keys", detail=f"{what}: larger than 1 MiB")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UnavailableError("cannot load token verification keys", detail=f"{what}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise UnavailableError("cannot load token verification keys", detail=f"{what}: not a JSON object")
    return doc


def _discovery(doc: Mapping[str, Any], what: str) -> Discovery:
    try:
        return Discovery.parse(doc)
    except ValueError as exc:
        raise UnavailableError("cannot load token verification keys", detail=f"{what}: {exc}") from exc


class KubeFetcher:
    """Discovery and keys from the apiserver, through the shared Kubernetes client and its credentials."""

    def __init__(self, api_client: Any) -> None:
        self._api = api_client

    def _get_sync(self, path: str) -> bytes:
        method, url, headers, _, _ = self._api.param_serialize(
            method="GET",
            resource_path=path,
            header_params={"Accept": ACCEPT},
            auth_settings=["BearerToken"],
        )
        response = self._api.call_api(method, url, header_params=headers)
        data: bytes = response.read()
        if not 200 <= response.status <= 299:
            raise OSError(f"HTTP {response.status} {response.reason}")
        return data

    async def _get(self, path: str) -> Mapping[str, Any]:
        try:
            data = await asyncio.to_thread(self._get_sync, path)
        except Exception as exc:  # ApiException, urllib3 and socket errors: all "try later"
            raise UnavailableError(
                "cannot load token verification keys", detail=f"GET {path} from the apiserver: {exc}"[:500]
            ) from exc
        return _json_object(data, f"apiserver {path}")

    async def discovery(self) -> Discovery:
        return _discovery(await self._get(DISCOVERY_PATH), f"apiserver {DISCOVERY_PATH}")

    async def jwks(self, discovery: Discovery) -> Mapping[str, Any]:
        return await self._get(APISERVER_JWKS_PATH)


class UrlFetcher:
    """Discovery at ``<issuer_url>/.well-known/openid-configuration``, keys at its ``jwks_uri``."""

    def __init__(self, issuer_url: str, *, ca_file: str | None = None, timeout: float = 10.0) -> None:
        parsed = urllib.parse.urlsplit(issuer_url)
        if parsed.scheme != "https" or not parsed.netloc:
            raise ConfigError(f"--jwks-url: must be an https:// URL, got {issuer_url!r}")
        self._base = issuer_url.rstrip("/")
        try:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"--jwks-ca-file: cannot load {ca_file}: {exc}") from exc
        self._timeout = timeout

    def _get_sync(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"Accept": ACCEPT})  # noqa: S310 (https checked)
        with urllib.request.urlopen(request, context=self._ssl, timeout=self._timeout) as response:  # noqa: S310
            data: bytes = response.read(MAX_DOCUMENT_BYTES + 1)
            return data

    async def _get(self, url: str) -> Mapping[str, Any]:
        try:
            data = await asyncio.to_thread(self._get_sync, url)
        except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
            raise UnavailableError("cannot load token verification keys", detail=f"GET {url}: {exc}"[:500]) from exc
        return _json_object(data, url)

    async def discovery(self) -> Discovery:
        url = self._base + DISCOVERY_PATH
        return _discovery(await self._get(url), url)

    async def jwks(self, discovery: Discovery) -> Mapping[str, Any]:
        if urllib.parse.urlsplit(discovery.jwks_uri).scheme != "https":
            raise UnavailableError(
                "cannot load token verification keys", detail=f"jwks_uri {discovery.jwks_uri[:200]!r} is not https"
            )
        return await self._get(discovery.jwks_uri)


class DiscoveryKeySource:
    """A :class:`~csr_service.pipeline.authn.jwt.KeySource` kept fresh from OpenID discovery."""

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        refresh_interval: timedelta = timedelta(minutes=5),
        min_refresh_interval: timedelta = MIN_REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetcher = fetcher
        self._refresh_every = refresh_interval.total_seconds()
        self._min_interval = min_refresh_interval.total_seconds()
        self._clock = clock
        self._keys: StaticKeySource | None = None
        self._kids: frozenset[str] = frozenset()
        self.issuer: str | None = None
        self._loaded_at = 0.0
        self._last_attempt: float | None = None
        self._last_error = "token verification keys not loaded yet"
        self._task: asyncio.Task[None] | None = None
        #: Fetches done / failed, unknown-kid refreshes, and fetches skipped by the rate limit.
        self.stats = {"fetches": 0, "fetch_errors": 0, "unknown_kid_refreshes": 0, "rate_limited": 0}

    async def get(self, kid: str | None) -> PyJWK | None:
        """The key for ``kid``; loads or refreshes the key set as described in the module docstring."""
        if self._keys is None:
            await self._refresh_on_demand()
            if self._keys is None:
                raise UnavailableError("cannot load token verification keys", detail=self._last_error)
        elif self._clock() - self._loaded_at >= self._refresh_every:
            self._start_refresh()  # in the background: this request uses the keys we have
        key = await self._keys.get(kid)
        if key is None and kid is not None:
            self.stats["unknown_kid_refreshes"] += 1
            await self._refresh_on_demand()
            key = await self._keys.get(kid)
        return key

    async def _refresh_on_demand(self) -> None:
        last = self._last_attempt
        if last is not None and self._clock() - last < self._min_interval and self._task is None:
            self.stats["rate_limited"] += 1
            return
        await asyncio.shield(self._start_refresh())

    def _start_refresh(self) -> asyncio.Task[None]:
        """One refresh at a time; concurrent callers share it."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())
        return self._task

    async def _refresh(self) -> None:
        self._last_attempt = self._clock()
        self.stats["fetches"] += 1
        try:
            discovery = await self._fetcher.discovery()
            doc = await self._fetcher.jwks(discovery)
            keys = StaticKeySource(doc)
        except (UnavailableError, ConfigError) as exc:
            self.stats["fetch_errors"] += 1
            detail = exc.detail if isinstance(exc, UnavailableError) else f"key set not usable: {exc}"
            self._last_error = detail
            log.warning("jwks: refreshing the key set failed (keeping %d known keys): %s", len(self._kids), detail)
            return
        finally:
            self._task = None
        listed = doc.get("keys")
        kids = frozenset(
            k["kid"]
            for k in (listed if isinstance(listed, list) else ())
            if isinstance(k, dict) and isinstance(k.get("kid"), str)
        )
        if kids != self._kids or discovery.issuer != self.issuer:
            log.info("jwks: issuer=%s keys=%s", discovery.issuer, ",".join(sorted(kids)) or "-")
        self._keys, self._kids, self.issuer = keys, kids, discovery.issuer
        self._loaded_at = self._clock()


class JWKSAuthenticator(JWTAuthenticator):
    """JWTAuthenticator over a :class:`DiscoveryKeySource`; the issuer must match discovery
    (or ``issuer`` when given)."""

    name = "jwks"

    def __init__(
        self,
        keys: DiscoveryKeySource,
        *,
        trust_domain: str,
        audiences: Sequence[str] = ("istio-ca",),
        issuer: str | None = None,
        leeway: timedelta = timedelta(seconds=30),
        cache_size: int = VERIFIED_TOKENS_MAX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # The base class checks iss only against a fixed string; ours is known after discovery,
        # so it is checked in _caller, on the verified claims.
        super().__init__(
            keys,
            trust_domain=trust_domain,
            audiences=audiences,
            issuer=None,
            leeway=leeway,
            cache_size=cache_size,
            clock=clock,
        )
        self._source = keys
        self._expected_issuer = issuer

    def _cache_context(self) -> Hashable:
        # The issuer _caller checks comes from discovery and may change on a refresh.
        return self._expected_issuer or self._source.issuer

    def _caller(self, claims: Mapping[str, Any]) -> Caller:
        expected = self._expected_issuer or self._source.issuer
        iss = claims.get("iss")
        if expected is None or iss != expected:
            raise AuthenticationError(
                "authentication failed: token issuer not accepted",
                detail=f"token iss {str(iss)[:200]!r} is not {expected!r}",
            )
        return super()._caller(claims)


def create(values: Mapping[str, Any], runtime: Runtime) -> JWKSAuthenticator:
    """``--authenticator jwks``: keys from the apiserver's discovery, or from ``--jwks-url``."""
    settings = JWKSSettings.from_values(values)
    fetcher: Fetcher
    if settings.url:
        timeout = runtime.kube_request_timeout.total_seconds()
        fetcher = UrlFetcher(settings.url, ca_file=settings.ca_file, timeout=timeout)
    else:
        fetcher = KubeFetcher(runtime.kube())
    return JWKSAuthenticator(
        DiscoveryKeySource(fetcher, refresh_interval=settings.refresh_interval),
        trust_domain=runtime.trust_domain,
        audiences=settings.audiences,
        issuer=settings.issuer,
        leeway=settings.leeway,
    )
