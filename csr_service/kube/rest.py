"""Kubernetes API calls from the event loop, with the ``kubernetes`` client's own credentials.

The per-CSR calls of the cert-manager issuer (create and delete a CertificateRequest) are
what csr-service spends most of its CPU on with that issuer when they go through the
synchronous ``kubernetes`` client: a thread hand-off, its parameter and model handling and
urllib3 per call (``python -m bench.certmanager`` shows the cost). :class:`KubeREST` makes
those JSON calls on :class:`~csr_service.infra.httpclient.AsyncHTTP` instead, from the event loop.

Everything that decides *how* to reach the apiserver still comes from the loaded
``kubernetes`` configuration, so kubeconfig and in-cluster set-ups behave the same on both
paths: server URL, CA bundle (or insecure-skip-tls-verify), ``tls-server-name``, client
certificate, and the bearer token, read through the configuration's refresh hook (in-cluster
projected tokens are re-read, exec credential plugins re-run when their token expires) at
most once a second. A client certificate is loaded once, when the client is built, as the
``kubernetes`` client's urllib3 pool does. Calls take a token from the same client-side
QPS/burst bucket.

:func:`for_client` returns ``None`` — callers keep the ``kubernetes`` client — when that
client is not the one :func:`~csr_service.kube.client.new_api_client` builds (tests' fakes)
or when it would go through a proxy, which this path does not speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import ssl
import time
from typing import Any

from csr_service.infra.httpclient import AsyncHTTP

__all__ = ["KubeAPIError", "KubeREST", "for_client"]

#: Idle keep-alive connections are reused; this caps the parallel ones (like the urllib3 pool).
_MAX_CONNECTIONS = 64
#: Seconds a read of the credentials is reused (see KubeREST._auth).
_AUTH_REFRESH = 1.0


class KubeAPIError(Exception):
    """The apiserver answered with an error status; shaped like ``kubernetes``' ``ApiException``
    (``status``, ``reason``, ``body``) so one classifier handles both paths."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status
        self.reason = reason
        self.body = body


def _tls(cfg: Any) -> ssl.SSLContext:
    """The TLS context the ``kubernetes`` client (urllib3) would use."""
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None, cadata=getattr(cfg, "ca_cert_data", None))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # this client speaks HTTP/1.1 only
    if not cfg.verify_ssl:  # kubeconfig insecure-skip-tls-verify
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cfg.assert_hostname is False:
        ctx.check_hostname = False
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


class KubeREST:
    """JSON calls to one apiserver; see the module docstring.

    Args:
        configuration: a loaded ``kubernetes.client.Configuration``.
        bucket: the shared :class:`~csr_service.kube.client.TokenBucket`, or ``None`` (no limit).
        timeout: per-call timeout in seconds (``--kube-request-timeout``).
    """

    def __init__(self, configuration: Any, *, bucket: Any, timeout: float) -> None:
        self._cfg = configuration
        self._bucket = bucket
        self._auth_headers: dict[str, str] | None = None
        self._auth_read = 0.0
        self._http = AsyncHTTP(
            configuration.host,
            max_connections=_MAX_CONNECTIONS,
            timeout=timeout,
            tls=functools.partial(_tls, configuration),
            server_hostname=configuration.tls_server_name or None,
            peer="the Kubernetes API",
        )

    def _auth(self) -> dict[str, str]:
        """The credential headers, re-read at most every :data:`_AUTH_REFRESH` seconds.

        ``auth_settings()`` runs the configuration's refresh hook (token file re-read, exec
        plugin re-run when expired), as every call of the kubernetes client does; the
        kubeconfig loader's hook also re-applies the whole configuration each time, a
        measurable share of a CertificateRequest create. Tokens live for minutes at least, so
        a second's reuse changes nothing for their rotation.
        """
        now = time.monotonic()
        if self._auth_headers is None or now - self._auth_read >= _AUTH_REFRESH:
            headers: dict[str, str] = {}
            for setting in self._cfg.auth_settings().values():
                if setting.get("in") == "header" and setting.get("value"):
                    headers[setting["key"]] = setting["value"]
            if self._cfg.username or self._cfg.password:
                headers["Authorization"] = self._cfg.get_basic_auth_token()
            self._auth_headers, self._auth_read = headers, now
        return self._auth_headers

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "csr-service", **self._auth()}
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``method`` ``path`` (e.g. ``/apis/g/v/namespaces/ns/things``) with a JSON body; the
        decoded answer. Errors: :class:`KubeAPIError` for an error status, ``ConnectionError``
        or ``TimeoutError`` when the apiserver cannot be reached in time."""
        if self._bucket is not None:
            wait = self._bucket.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else b""
        answer = await self._http.request(method, path, self._headers(body is not None), payload)
        if answer.status >= 400:
            text = answer.body.decode("utf-8", "replace")
            reason = ""
            with contextlib.suppress(ValueError, AttributeError):  # a Status object names the reason
                reason = str(json.loads(text).get("reason", ""))
            raise KubeAPIError(answer.status, reason or f"HTTP {answer.status}", text)
        try:
            decoded = json.loads(answer.body) if answer.body else {}
        except ValueError as exc:
            raise ConnectionError(f"the Kubernetes API answered {method} {path} with something not JSON") from exc
        if not isinstance(decoded, dict):
            raise ConnectionError(f"the Kubernetes API answered {method} {path} with JSON that is not an object")
        return decoded

    async def aclose(self) -> None:
        await self._http.aclose()


def for_client(api_client: Any) -> KubeREST | None:
    """A :class:`KubeREST` sharing ``api_client``'s configuration and rate limit, or ``None``
    when this path cannot stand in for it (see the module docstring)."""
    from kubernetes.client.rest import should_bypass_proxies

    from csr_service.kube.client import RateLimitedApiClient

    if RateLimitedApiClient is None or not isinstance(api_client, RateLimitedApiClient):
        return None
    client: Any = api_client
    cfg = client.configuration
    if cfg.proxy and not should_bypass_proxies(cfg.host, cfg.no_proxy or ""):
        return None
    return KubeREST(cfg, bucket=client.bucket, timeout=client.default_timeout or 30.0)
