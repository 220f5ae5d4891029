"""One long-lived, authenticated Vault client, shared by every request.

hvac has no lifetime watcher, so this module keeps the token alive itself, the way SPIRE's
Vault plugin does (and unlike cert-manager's Vault issuer, which logs in on every sign and
builds up leases, cert-manager#1430):

- log in once at start (token file + ``lookup-self``, kubernetes, or approle);
- renew at about two thirds of the lease (``renew-self``); log in again when renewal is
  refused, the token is not renewable, or renewal stops extending it (max TTL reached);
- when Vault answers 403/401 to a call, log in again *once* (whichever request notices
  first; the others reuse the new token) and retry that call once;
- when Vault is unreachable, probe it in the background with back-off so readiness recovers
  without traffic and without restarting csr-service.

The sign call — the only one per workload request — goes through :meth:`VaultClient.post`,
which speaks HTTP/1.1 from the event loop (:mod:`.http`) with the same token, headers and
error mapping as hvac, because hvac/requests in a thread cost more CPU than the rest of a
request. Everything else (logins, renewal, KV and root reads) is rare and uses hvac, which is
synchronous: those calls run in a dedicated thread pool. When the environment routes Vault
through a proxy, or a test injects a requests transport, ``post`` uses hvac too. Every
exception leaving this module is translated into a :mod:`csr_service.common.errors` class by
:func:`translate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import requests
from hvac import exceptions as hv
from requests.adapters import BaseAdapter, HTTPAdapter

from csr_service.common.errors import (
    CSRServiceError,
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.common.lifecycle import BackgroundTask
from csr_service.infra.httpclient import AsyncHTTP, HTTPAnswer, ssl_context
from issuers.vault_connection.settings import AppRoleAuth, ConnectionSettings, KubernetesAuth, TokenAuth

__all__ = ["VaultClient", "response_object", "response_warnings", "translate"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Renew (or log in again) when this fraction of the lease has passed.
RENEW_FRACTION = 2 / 3
#: Never schedule maintenance closer than this (a nearly expired, non-renewable token).
MIN_MAINTENANCE = 1.0
#: Background probe back-off while Vault is unreachable.
PROBE_BACKOFF_MAX = 30.0
#: How often to look again when there is nothing to renew (a root or periodic-less token).
IDLE_CHECK = 300.0

_UNAVAILABLE_HV = (
    hv.InternalServerError,
    hv.VaultDown,
    hv.BadGateway,
    hv.VaultNotInitialized,
    hv.UnexpectedError,
    hv.PreconditionFailed,  # performance standby not caught up: transient
)
_REJECTED_HV = (hv.InvalidRequest, hv.InvalidPath, hv.UnsupportedOperation)
_AUTH_HV = (hv.Forbidden, hv.Unauthorized)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


def translate(
    exc: BaseException,
    *,
    operation: str,
    rejected: Callable[[str], CSRServiceError] | None = None,
) -> CSRServiceError:
    """Map an hvac/requests exception to the csr-service error table (BACKENDS.md).

    ``operation`` names what was attempted (for the log). ``rejected`` builds the error for a
    400/404 answer, which means different things per caller (a role refusing a CSR, a
    missing KV secret); the default is a generic FAILED_PRECONDITION.
    """
    if isinstance(exc, CSRServiceError):
        return exc
    detail = f"Vault {operation}: {_short(exc)}"
    if isinstance(exc, hv.RateLimitExceeded):
        return ResourceExhaustedError("the certificate authority is rate-limiting requests; retry later", detail=detail)
    if isinstance(exc, _UNAVAILABLE_HV):
        return UnavailableError("the certificate authority is temporarily unavailable", detail=detail)
    if isinstance(exc, _AUTH_HV):
        return FailedPreconditionError(
            "csr-service is not authorised by Vault; check its Vault credentials and policy", detail=detail
        )
    if isinstance(exc, _REJECTED_HV):
        if rejected is not None:
            return rejected(detail)
        return FailedPreconditionError("Vault rejected the request; check the Vault configuration", detail=detail)
    if isinstance(exc, requests.Timeout | TimeoutError):
        return UnavailableError("the certificate authority did not answer in time", detail=detail)
    if isinstance(exc, requests.RequestException | hv.VaultError | OSError):
        return UnavailableError("the certificate authority is unreachable", detail=detail)
    return InternalError("unexpected failure talking to the certificate authority", detail=detail)


def _session(settings: ConnectionSettings) -> tuple[requests.Session, bool | str]:
    """A Session that reads the environment once, not on every request.

    With ``trust_env`` requests re-reads proxy variables and ~/.netrc for each call, which
    costs more CPU than the rest of a sign round trip; the environment cannot change while
    we run, so resolve proxies and the CA bundle variables here and switch that off.
    """
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(settings.address))
    session.trust_env = False
    env_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    verify: bool | str = settings.ca_bundle or env_bundle or True
    # hvac prefers the session's verify/cert over its own arguments when given a session
    # (hvac#991), so they must be set here or --vault-ca-bundle would be ignored.
    session.verify = verify
    if settings.client_cert and settings.client_key:
        session.cert = (settings.client_cert, settings.client_key)
    return session, verify


def _read_secret_file(path: str, flag: str) -> str:
    """Read a credential file fresh (they are rotated); never echo its content."""
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise FailedPreconditionError(
            "csr-service cannot read its Vault credentials",
            detail=f"--{flag}: cannot read {path}: {exc.strerror}",
        ) from exc
    if not value:
        raise FailedPreconditionError(
            "csr-service cannot read its Vault credentials", detail=f"--{flag}: {path} is empty"
        )
    return value


@dataclass(frozen=True, slots=True)
class _Lease:
    """What Vault told us about the current token; times are ``time.monotonic()``."""

    obtained: float
    ttl: float  # seconds; 0 means the token never expires (root / no TTL)
    renewable: bool
    #: The lease granted at login; a renewal giving much less means the max TTL is near.
    granted: float
    at_max: bool = False

    @property
    def renew_at(self) -> float | None:
        return None if self.ttl <= 0 else self.obtained + self.ttl * RENEW_FRACTION

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl <= 0 else self.obtained + self.ttl

    def valid(self) -> bool:
        """Not expired (a token without a TTL never expires)."""
        expires_at = self.expires_at
        return expires_at is None or time.monotonic() < expires_at


class VaultClient:
    """The shared authenticated hvac client with renewal, re-login and error translation.

    ``call(fn)`` runs ``fn(hvac_client)`` in the client's thread pool. Start with
    :meth:`start` (logs in, starts the maintenance task) and release with :meth:`stop`.
    """

    def __init__(
        self, settings: ConnectionSettings, *, name: str = "vault", transport: BaseAdapter | None = None
    ) -> None:
        """``transport`` replaces the HTTP adapter (tests pass an in-memory Vault)."""
        self.settings = settings
        self._session, verify = _session(settings)
        # One pooled connection per worker thread: no request waits for a socket.
        adapter = transport or HTTPAdapter(pool_connections=4, pool_maxsize=settings.max_connections)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        cert = (settings.client_cert, settings.client_key) if settings.client_cert else None
        common: dict[str, Any] = dict(
            url=settings.address,
            verify=verify,
            cert=cert,
            timeout=settings.timeout.total_seconds(),
            session=self._session,
            namespace=settings.namespace,
        )
        # The event-loop transport for post(), unless requests must do it: a proxy from the
        # environment applies to this address, or a test replaced the transport.
        self._http: AsyncHTTP | None = None
        if transport is None and not self._session.proxies:
            self._http = AsyncHTTP(
                settings.address,
                max_connections=settings.max_connections,
                timeout=settings.timeout.total_seconds(),
                tls=functools.partial(
                    ssl_context, verify if isinstance(verify, str) else None, settings.client_cert, settings.client_key
                ),
                peer="Vault",
            )
        # token="" rather than None: hvac would otherwise fall back to VAULT_TOKEN / ~/.vault-token.
        self._hvac = hvac.Client(token="", **common)
        # Logins go out without any token: a revoked token in X-Vault-Token must not spoil them.
        self._login_hvac = hvac.Client(token="", **common)
        self._executor = ThreadPoolExecutor(max_workers=settings.max_connections, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._generation = 0
        self._lease: _Lease | None = None
        self._last_error: str | None = None
        self._failures = 0
        # Sleeps until the next renewal; a failed call wakes it to start probing.
        self._maintenance = BackgroundTask(
            f"{name}-token-maintenance", self._maintain, every=self._next_delay, logger=log
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"VaultClient(address={self.settings.address!r}, auth={self.settings.auth.describe()!r})"

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Log in (raise a csr_service error if that fails) and start renewing in the background."""
        if self._lease is None:
            try:
                await self._run(self._ensure_login)
            except Exception as exc:
                self._note_failure(exc)
                raise translate(exc, operation="login") from exc
        if not self._maintenance.running:
            log.info("Vault sign calls go %s", self.sign_transport)
            self._maintenance.start()

    @property
    def sign_transport(self) -> str:
        """How :meth:`post` reaches Vault, for the start-up log (proxies change it)."""
        if self._http is not None:
            return f"straight to {self.settings.address} from the event loop"
        proxy = self._session.proxies.get(self.settings.address.split(":", 1)[0])
        return f"through the proxy {proxy} (hvac)" if proxy else "through hvac (test transport)"

    async def stop(self) -> None:
        """Stop maintenance, revoke a token we obtained by logging in, close connections."""
        if self._closed:
            return
        self._closed = True
        await self._maintenance.stop()
        if self._lease is not None and not isinstance(self.settings.auth, TokenAuth):
            # Tokens from logins are ours alone: revoke so leases do not pile up in Vault.
            # A token from a file belongs to the operator (or Vault Agent): leave it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self._hvac.auth.token.revoke_self), timeout=2)
        if self._http is not None:
            await self._http.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    # --- calls ------------------------------------------------------------------------
    async def call(
        self,
        fn: Callable[[hvac.Client], T],
        *,
        operation: str,
        rejected: Callable[[str], CSRServiceError] | None = None,
    ) -> T:
        """Run ``fn(client)`` in the pool; on 403/401 log in again once and retry once.

        Raises the translated :mod:`csr_service.common.errors` class (see :func:`translate`).
        """
        return await self._guarded(lambda: self._run(self._call_sync, fn, operation), operation, rejected)

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        *,
        operation: str,
        rejected: Callable[[str], CSRServiceError] | None = None,
    ) -> Any:
        """``POST <path>`` (``/v1/...``) with JSON ``body``; the decoded JSON answer.

        Same contract as :meth:`call`: one re-login and retry on 403/401, errors translated.
        """
        http = self._http
        if http is None:
            return await self.call(lambda c: c.adapter.post(path, json=body), operation=operation, rejected=rejected)
        return await self._guarded(lambda: self._post_fast(http, path, json.dumps(body).encode()), operation, rejected)

    async def _guarded(
        self,
        attempt: Callable[[], Awaitable[T]],
        operation: str,
        rejected: Callable[[str], CSRServiceError] | None,
    ) -> T:
        """Run one call: refused once closed; failures recorded (readiness) and translated."""
        if self._closed:
            raise UnavailableError("the certificate authority client is shut down", detail=f"{self!r} is closed")
        try:
            result = await attempt()
        except Exception as exc:
            self._note_failure(exc)
            raise translate(exc, operation=operation, rejected=rejected) from exc
        self._last_error = None
        self._failures = 0
        return result

    async def _post_fast(self, http: AsyncHTTP, path: str, payload: bytes) -> Any:
        """:meth:`_call_sync`'s contract from the event loop: one re-login and retry on 403/401."""
        lease = self._lease
        generation = self._generation if lease is not None and lease.valid() else await self._run(self._ensure_login)
        try:
            return _decode(await http.request("POST", path, self._headers(), payload), "POST", path)
        except _AUTH_HV as exc:
            _log_token_refused(f"POST {path}", exc)
            await self._run(lambda: self._relogin(seen_generation=generation))
            return _decode(await http.request("POST", path, self._headers(), payload), "POST", path)

    def _headers(self) -> dict[str, str]:
        # What hvac sends: the token, the namespace, and X-Vault-Request (Vault Agent and
        # some proxies insist on it).
        headers = {"X-Vault-Token": str(self._hvac.token or ""), "X-Vault-Request": "true"}
        headers["Content-Type"] = "application/json"
        if self.settings.namespace:
            headers["X-Vault-Namespace"] = self.settings.namespace
        return headers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()  # keep the request id for log lines
        result: T = await loop.run_in_executor(self._executor, ctx.run, fn, *args)
        return result

    def _call_sync(self, fn: Callable[[hvac.Client], T], operation: str) -> T:
        generation = self._ensure_login()
        try:
            return fn(self._hvac)
        except _AUTH_HV as exc:
            _log_token_refused(operation, exc)
            self._relogin(seen_generation=generation)
            return fn(self._hvac)

    def _note_failure(self, exc: BaseException) -> None:
        # Only "Vault is not there" makes us unhealthy; a refused CSR says nothing about Vault.
        if isinstance(exc, (*_UNAVAILABLE_HV, requests.RequestException, OSError)):
            if self._last_error is None:
                self._maintenance.wake()  # it was asleep until the next renewal
            self._last_error = _short(exc, 200)
            self._failures += 1

    # --- authentication (runs in pool threads) ------------------------------------------------
    def _ensure_login(self) -> int:
        lease = self._lease
        if lease is not None and lease.valid():
            return self._generation
        with self._lock:
            lease = self._lease
            if lease is None or not lease.valid():
                self._login_locked("no valid token" if lease is None else "token expired")
            return self._generation

    def _relogin(self, *, seen_generation: int) -> None:
        with self._lock:
            if self._generation == seen_generation:  # nobody else logged in meanwhile
                self._login_locked("token refused")

    def _login_locked(self, reason: str) -> None:
        auth = self.settings.auth
        started = time.monotonic()
        try:
            token, ttl, renewable = self._obtain_token()
        except (*_AUTH_HV, *_REJECTED_HV) as exc:
            # Classified here, not by the caller: a refused login inside a sign call is a
            # credentials problem, not the PKI role refusing the CSR.
            raise FailedPreconditionError(
                "csr-service cannot log in to Vault; check its Vault credentials and auth method configuration",
                detail=f"Vault login with {auth.describe()}: {_short(exc)}",
            ) from exc
        self._hvac.token = token
        self._generation += 1
        self._lease = _Lease(obtained=started, ttl=ttl, renewable=renewable, granted=ttl)
        log.info(
            "logged in to Vault at %s with %s (%s): token TTL %s, %srenewable",
            self.settings.address,
            auth.describe(),
            reason,
            f"{ttl:.0f}s" if ttl else "none",
            "" if renewable else "not ",
        )

    def _obtain_token(self) -> tuple[str, float, bool]:
        """(token, TTL seconds, renewable) from the configured auth method."""
        auth = self.settings.auth
        if isinstance(auth, TokenAuth):
            token = _read_secret_file(auth.token_file, "vault-token-file")
            # lookup-self with the candidate token: learns TTL/renewability and proves it works.
            info = self._login_hvac.adapter.get("/v1/auth/token/lookup-self", headers={"X-Vault-Token": token})
            data = response_object(info, "data", "auth/token/lookup-self")
            ttl = float(data.get("ttl") or 0)
            renewable = bool(data.get("renewable"))
        else:
            if isinstance(auth, KubernetesAuth):
                jwt = _read_secret_file(auth.token_file, "vault-kubernetes-token-file")
                resp = self._login_hvac.auth.kubernetes.login(auth.role, jwt, use_token=False, mount_point=auth.mount)
            else:
                assert isinstance(auth, AppRoleAuth)
                role_id = _read_secret_file(auth.role_id_file, "vault-approle-role-id-file")
                secret_id = _read_secret_file(auth.secret_id_file, "vault-approle-secret-id-file")
                resp = self._login_hvac.auth.approle.login(role_id, secret_id, use_token=False, mount_point=auth.mount)
            data = response_object(resp, "auth", f"{auth.mount} login")
            token = str(data.get("client_token") or "")
            if not token:
                raise InternalError("Vault login returned no token", detail=f"{auth.describe()}: no client_token")
            ttl = float(data.get("lease_duration") or 0)
            renewable = bool(data.get("renewable"))
        return token, ttl, renewable

    def _renew_locked(self, lease: _Lease) -> None:
        started = time.monotonic()
        resp = self._hvac.auth.token.renew_self()
        data = response_object(resp, "auth", "auth/token/renew-self")
        ttl = float(data.get("lease_duration") or 0)
        # Vault caps renewals at the max TTL (with a warning); once a renewal no longer
        # restores two thirds of the original lease, log in again (at 2/3 of what is left)
        # instead of renewing into ever shorter leases.
        at_max = lease.granted > 0 and ttl < lease.granted * RENEW_FRACTION
        self._lease = _Lease(
            obtained=started,
            ttl=ttl,
            renewable=bool(data.get("renewable")),
            granted=lease.granted,
            at_max=at_max,
        )
        for warning in response_warnings(resp):
            log.info("Vault warning on token renewal: %s", warning)
        log.debug("renewed the Vault token: TTL %.0fs%s", ttl, " (max TTL reached)" if at_max else "")

    # --- background maintenance -----------------------------------------------------------------
    def _next_delay(self) -> float:
        if self._last_error is not None or self._lease is None:
            return min(PROBE_BACKOFF_MAX, MIN_MAINTENANCE * float(2 ** min(self._failures, 5)))
        renew_at = self._lease.renew_at
        if renew_at is None:
            return IDLE_CHECK
        return max(MIN_MAINTENANCE, renew_at - time.monotonic())

    async def _maintain(self) -> None:
        """One round: renew, log in again or probe, as :meth:`_maintain_sync` decides."""
        try:
            await self._run(self._maintain_sync)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything: it is our only renewer
            self._note_failure(exc)
            self._failures = max(self._failures, 1)
            log.warning("Vault token maintenance failed (will retry): %s", translate(exc, operation="maintenance"))

    def _maintain_sync(self) -> None:
        with self._lock:
            lease = self._lease
            if lease is None:
                self._login_locked("not logged in")
            elif self._last_error is not None:
                self._probe_locked()
            elif lease.renew_at is not None and time.monotonic() >= lease.renew_at:
                if lease.renewable and not lease.at_max:
                    try:
                        self._renew_locked(lease)
                    except (*_AUTH_HV, *_REJECTED_HV) as exc:
                        log.info("Vault refused to renew the token (%s); logging in again", _short(exc))
                        self._login_locked("renewal refused")
                else:
                    self._login_locked("max TTL reached" if lease.at_max else "token not renewable")
        self._last_error = None
        self._failures = 0

    def _probe_locked(self) -> None:
        """After failures: is Vault back, and is our token still good?"""
        try:
            self._hvac.auth.token.lookup_self()
        except _AUTH_HV:
            # e.g. a dev server restarted, or the token was revoked while Vault was away.
            self._login_locked("token refused after an outage")
        log.info("Vault at %s is reachable again", self.settings.address)

    # --- readiness ------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        """(usable, reason) from what we already know; never calls Vault."""
        where = f"Vault at {self.settings.address}"
        if self._last_error is not None:
            return False, f"{where} is unavailable: {self._last_error}"
        if self._lease is None:
            return False, f"not logged in to {where} ({self.settings.auth.describe()})"
        return True, f"logged in to {where} with {self.settings.auth.describe()}"

    # --- plain reads for other users of the client (roots, Vault KV) -------------------------------
    @staticmethod
    def read(path: str) -> Callable[[hvac.Client], Any]:
        """A ``call``-able that GETs ``/v1/<path>`` and returns the decoded JSON."""
        return lambda c: c.adapter.get(f"/v1/{path.lstrip('/')}")


def _log_token_refused(operation: str, exc: BaseException) -> None:
    log.warning("Vault refused the token on %s (%s); logging in again and retrying once", operation, _short(exc))


def _decode(answer: HTTPAnswer, method: str, path: str) -> Any:
    """The JSON of a 2xx answer; for an error status, the hvac exception hvac would raise."""
    try:
        data = json.loads(answer.body) if answer.body else None
    except ValueError:
        data = None
    if answer.status >= 400:
        errors = data.get("errors") if isinstance(data, dict) else None
        text = None if errors else answer.body[:400].decode("utf-8", "replace")
        raise hv.VaultError.from_status(answer.status, text, errors=errors, method=method, url=path)
    if data is None and answer.body:
        raise InternalError("unexpected answer from Vault", detail=f"{method} {path}: the answer is not JSON")
    return data


def response_object(resp: Any, key: str, what: str) -> dict[str, Any]:
    """``resp[key]`` as a dict, or InternalError: hvac returns a Response for non-JSON answers."""
    if not isinstance(resp, dict) or not isinstance(resp.get(key), dict):
        raise InternalError("unexpected answer from Vault", detail=f"{what}: no {key!r} object in the response")
    value: dict[str, Any] = resp[key]
    return value


def response_warnings(resp: Any) -> list[str]:
    """The top-level ``warnings`` of a Vault answer (e.g. a TTL truncated to the role's max_ttl)."""
    if isinstance(resp, dict) and isinstance(resp.get("warnings"), list):
        return [str(w) for w in resp["warnings"]]
    return []
