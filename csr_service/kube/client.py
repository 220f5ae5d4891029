"""The Kubernetes API client: kubeconfig or in-cluster, with a client-side QPS/burst limit.

The Python ``kubernetes`` client is synchronous and has no rate limiter. We add a token bucket
in front of every request (including watch starts), shared by everything in the process,
with defaults far above client-go's QPS 5 / burst 10 — those defaults are what made
istio-csr throttle itself during mass restarts (istio-csr #217, #144) — but still a limit, so a
bug cannot flood the apiserver. ``--kube-qps 0`` disables it.

Callers run API calls in threads (``asyncio.to_thread``); the connection pool is sized for it.
The hot per-CSR calls go through :mod:`csr_service.kube.rest` instead, from the event loop,
with this client's configuration and the same bucket.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.common.errors import ConfigError

__all__ = ["KubeSettings", "RateLimitedApiClient", "TokenBucket", "api_client_from_kubeconfig", "new_api_client"]


class TokenBucket:
    """Thread-safe token bucket: ``qps`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take one token now; returns how long to wait before using it (event-loop callers
        sleep that long with ``asyncio.sleep``, threads with :meth:`acquire`)."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1
            return -self._tokens / self.qps if self._tokens < 0 else 0.0

    def acquire(self) -> float:
        """Take one token, sleeping if needed; returns the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)
        return wait


@dataclass(frozen=True, slots=True)
class KubeSettings:
    kubeconfig: str | None
    context: str | None
    qps: float
    burst: int
    request_timeout: timedelta

    @classmethod
    def from_values(cls, v: dict[str, Any]) -> KubeSettings:
        if v["kube-qps"] < 0 or v["kube-burst"] < 0:
            raise ConfigError("--kube-qps/--kube-burst: must be >= 0")
        return cls(
            kubeconfig=v["kubeconfig"] or None,
            context=v["kube-context"] or None,
            qps=float(v["kube-qps"]),
            burst=int(v["kube-burst"]),
            request_timeout=v["kube-request-timeout"],
        )


def _rate_limited_class() -> type:
    from kubernetes import client

    class _RateLimitedApiClient(client.ApiClient):
        """ApiClient whose every request first takes a token from the shared bucket."""

        bucket: TokenBucket | None = None
        default_timeout: float | None = None

        def call_api(self, *args: Any, **kwargs: Any) -> Any:
            if self.bucket is not None:
                self.bucket.acquire()
            # A dead connection must not hang a caller forever: default per-request timeout,
            # except for watches, which set their own (timeout_seconds) and stream.
            # (kubernetes >= 35 no longer passes _preload_content here: the URL tells a watch.)
            url = args[1] if len(args) > 1 else kwargs.get("url", "")
            streaming = kwargs.get("_preload_content", True) is False or "watch=true" in str(url).lower()
            if self.default_timeout and kwargs.get("_request_timeout") is None and not streaming:
                kwargs["_request_timeout"] = self.default_timeout
            return super().call_api(*args, **kwargs)

    return _RateLimitedApiClient


RateLimitedApiClient: type | None = None


def new_api_client(settings: KubeSettings, *, pool_size: int = 64) -> Any:
    """A ``kubernetes.client.ApiClient`` for ``settings`` (kubeconfig, else in-cluster)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if settings.kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=settings.kubeconfig, context=settings.context, client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            raise ConfigError("--kubeconfig: not running in a cluster; give a kubeconfig file")
    except (config.ConfigException, OSError, ValueError) as exc:
        raise ConfigError(f"--kubeconfig: cannot load Kubernetes configuration: {exc}") from exc
    return _limited(configuration, settings, pool_size)


def _limited(configuration: Any, settings: KubeSettings, pool_size: int) -> Any:
    """The rate-limited client over a loaded configuration: its own bucket, its own pool."""
    global RateLimitedApiClient
    configuration.connection_pool_maxsize = pool_size
    if RateLimitedApiClient is None:
        RateLimitedApiClient = _rate_limited_class()
    api = RateLimitedApiClient(configuration)
    api.bucket = TokenBucket(settings.qps, settings.burst) if settings.qps > 0 else None
    api.default_timeout = settings.request_timeout.total_seconds()
    return api


def api_client_from_kubeconfig(doc: dict[str, Any], settings: KubeSettings, *, pool_size: int = 32) -> Any:
    """A client for a kubeconfig given as a parsed document (a remote cluster's), with a token
    bucket of its own (``settings.qps``/``burst``): one cluster's storm cannot slow another's
    calls. Raises ValueError for a kubeconfig that cannot be loaded."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config_from_dict(  # type: ignore[no-untyped-call]
            doc, client_configuration=configuration, persist_config=False
        )
    except (config.ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot load the kubeconfig: {exc}") from exc
    return _limited(configuration, settings, pool_size)
