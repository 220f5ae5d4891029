"""The authenticator contract: turn a call's credentials into a :class:`Caller`.

Authenticators are plugins of the same shape as issuers (see :mod:`csr_service.plugins.registry`):
their own options, their own settings, a factory taking a narrow
:class:`~csr_service.plugins.runtime.Runtime`, registered in the entry-point group
``csr_service.authenticators``. The built-ins (``jwt``, ``tokenreview``, ``jwks``) live in
:mod:`csr_service.pipeline.authn`.

The contract (every authenticator MUST):

1. ``authenticate(ctx)`` is a coroutine (``ctx``: the call's :class:`RequestContext`, with its
   metadata and request id) that returns a :class:`Caller` whose ``identity`` is the
   caller's SPIFFE identity in the configured trust domain, or raises
   :class:`~csr_service.common.errors.AuthenticationError` (UNAUTHENTICATED) for a credential
   that is missing, malformed, expired, forged or for the wrong audience.
2. Trouble on its own side (the apiserver is down, its key set cannot be fetched) raises
   :class:`~csr_service.common.errors.UnavailableError` (or ``ResourceExhaustedError`` when
   rate-limited), so the client retries rather than giving up.
3. It never logs a token; ``public`` messages never include one.

Optional abilities, looked up once by :meth:`AuthenticatorAbilities.of`:

- :class:`~csr_service.common.lifecycle.Lifecycle`: ``start()``/``stop()``, run in every worker.
- :class:`CacheReporter`: ``cache_stats() -> (hits, misses)``, running totals for the
  ``csr_service_authn_cache_requests_total`` metric.
- :class:`ClusterCacheReporter`: ``cluster_cache_stats() -> {cluster id: (hits, misses)}``,
  the same per cluster (``csr_service_authn_cluster_cache_requests_total``).
- :class:`Recognizer`: ``recognizes(ctx) -> bool``, whether the call carries the kind of
  credential this authenticator handles. With ``--authenticators a,b`` the first that
  recognises the call decides (its verdict is final, the next is not asked); one without
  this ability recognises every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from csr_service.common.identity import SpiffeId
from csr_service.common.lifecycle import Lifecycle
from csr_service.common.request import RequestContext

__all__ = [
    "Authenticator",
    "AuthenticatorAbilities",
    "CacheReporter",
    "Caller",
    "ClusterCacheReporter",
    "Recognizer",
    "RequestContext",
]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated workload."""

    identity: SpiffeId
    pod_name: str | None = None
    pod_uid: str | None = None
    token_expires_at: datetime | None = None
    authenticator: str = ""
    #: The cluster whose apiserver vouched for the caller (its ``clusterid``); None when the
    #: credential is not tied to a cluster (a JWKS file, a client certificate).
    cluster_id: str | None = None

    @property
    def identities(self) -> tuple[str, ...]:
        return (self.identity.uri,)


@runtime_checkable
class Authenticator(Protocol):
    """Turns a call's credentials into a :class:`Caller` (see the module docstring)."""

    #: The name used in ``--authenticator``.
    name: str

    async def authenticate(self, ctx: RequestContext) -> Caller: ...


@runtime_checkable
class CacheReporter(Protocol):
    """The authenticator caches verdicts and counts hits and misses."""

    def cache_stats(self) -> tuple[int, int]:
        """Running totals (hits, misses) since start."""
        ...


@runtime_checkable
class ClusterCacheReporter(Protocol):
    """The authenticator caches verdicts per cluster (multi-cluster TokenReview)."""

    def cluster_cache_stats(self) -> Mapping[str, tuple[int, int]]:
        """Running totals (hits, misses) since start, by cluster id."""
        ...


@runtime_checkable
class Recognizer(Protocol):
    """The authenticator can tell whether a call carries its kind of credential."""

    def recognizes(self, ctx: RequestContext) -> bool:
        """True when this authenticator should decide about the call (cheap: no I/O)."""
        ...


@dataclass(frozen=True, slots=True)
class AuthenticatorAbilities:
    """An authenticator with its optional abilities looked up once."""

    authenticator: Authenticator
    name: str
    lifecycle: Lifecycle | None = None
    cache: CacheReporter | None = None
    recognizer: Recognizer | None = None
    cluster_cache: ClusterCacheReporter | None = None

    @classmethod
    def of(cls, authenticator: Authenticator) -> AuthenticatorAbilities:
        return cls(
            authenticator=authenticator,
            name=authenticator.name,
            lifecycle=authenticator if isinstance(authenticator, Lifecycle) else None,
            cache=authenticator if isinstance(authenticator, CacheReporter) else None,
            recognizer=authenticator if isinstance(authenticator, Recognizer) else None,
            cluster_cache=authenticator if isinstance(authenticator, ClusterCacheReporter) else None,
        )
