"""TokenReview authentication: ask the apiserver whether a caller's token is valid (as istiod does).

Checks (istiod's, see PROTOCOL.md): ``status.authenticated``; an audience from
``--token-audiences`` in ``status.audiences`` (an empty list there means the token is only good
for the apiserver itself, so it is refused); group ``system:serviceaccounts``; username
``system:serviceaccount:<ns>:<sa>``. The pod name and uid (for ztunnel impersonation) come from
``user.extra["authentication.kubernetes.io/pod-name"|"pod-uid"]``.

Why a cache, and how it stays safe:

- Every sidecar calls on start and at each rotation; thousands of pods restarting together would
  mean thousands of TokenReviews (istio-csr throttled itself into timeouts that way, #217).
  Accepted tokens are remembered by SHA-256 of the token (the token itself is never stored) for
  ``min(--tokenreview-cache-ttl, token exp - now)``. ``exp`` is read from the *unverified*
  payload and used only to shorten the lifetime: it cannot extend trust, and a token whose review
  succeeded was signed by the apiserver anyway. The cache is an LRU bounded by
  ``--tokenreview-cache-size``.
- Trade-off: a token of a pod deleted within the TTL keeps working until its entry expires
  (at most 5 minutes by default) — the same window a JWKS check has for the whole token life.
- Rejections are cached for :data:`NEGATIVE_TTL` (10 s) only: long enough that a workload
  retrying a bad token in a tight loop (istio-agent's outer loop starts at 0.5 s) costs one
  review per 10 s instead of one per call, short enough that a token refused because the
  apiserver had not yet seen its pod (HA apiservers, watch-cache lag) works again quickly.
- API errors (apiserver down, timeouts, 5xx, our own RBAC missing) are never cached and become
  UNAVAILABLE, so the client retries rather than giving up; 429 becomes RESOURCE_EXHAUSTED.
- Concurrent reviews of the same token share one API call: the first caller starts a task,
  later ones await it (``stats["coalesced"]``).

Every :meth:`authenticate` call with a well-formed bearer token counts exactly once in
``stats["hits"]``, ``stats["misses"]`` (an API call was made) or ``stats["coalesced"]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from csr_service.common.errors import (
    AuthenticationError,
    CSRServiceError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.common.identity import SpiffeId, service_account_from_username
from csr_service.common.request import RequestContext
from csr_service.kube.rest import KubeAPIError, for_client
from csr_service.kube.util import api_status
from csr_service.pipeline.authn.jwt import MAX_TOKEN_BYTES, decode_segment, numeric_date
from csr_service.pipeline.authn.settings import TokenReviewSettings
from csr_service.plugins.authenticator import Caller

if TYPE_CHECKING:
    from csr_service.kube.clusters import Cluster, ClusterSet
    from csr_service.plugins.runtime import Runtime

__all__ = [
    "NEGATIVE_TTL",
    "KubeTokenReviewer",
    "MultiClusterTokenReview",
    "ReviewResult",
    "TokenReviewAuthenticator",
    "TokenReviewer",
    "create",
]

log = logging.getLogger(__name__)

#: How long a rejected token is remembered (see the module docstring for why this short).
NEGATIVE_TTL = timedelta(seconds=10)
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """The parts of a ``TokenReviewStatus`` we use."""

    authenticated: bool
    username: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, Sequence[str]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""


class TokenReviewer(Protocol):
    """Performs one TokenReview. Raises UnavailableError/ResourceExhaustedError on API trouble."""

    async def review(self, token: str, audiences: Sequence[str]) -> ReviewResult: ...


class KubeTokenReviewer:
    """``POST /apis/authentication.k8s.io/v1/tokenreviews`` with csr-service's own credentials.

    From the event loop (:mod:`csr_service.kube.rest`) when the client allows it: in a mass
    restart every pod's first call costs a review, and through the synchronous ``kubernetes``
    client each one cost ~2.4 ms of csr-service CPU (a thread hand-off, model building and
    parsing, urllib3), more than the rest of the request and than the apiserver spent on it;
    from the event loop ~0.55 ms (``python -m bench.storm``: 10,000 workloads, 35 s instead of
    45-60 s to the last certificate on 2 shared cores). Otherwise (a test's plain client, a proxy) the
    calls run in a pool of their own, not asyncio's default executor: a storm of reviews must
    not queue ahead of the controllers' calls there, such as the leader lease renewal. Both
    paths take tokens from the client's QPS/burst bucket.
    """

    PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

    def __init__(self, api_client: Any, *, threads: int = 16) -> None:
        from kubernetes import client

        self._rest = for_client(api_client)
        self._api = client.AuthenticationV1Api(api_client)
        self._client = client
        self._pool = (
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenreview") if self._rest is None else None
        )

    @property
    def event_loop_calls(self) -> bool:
        """Whether reviews go out from the event loop (no thread per call)."""
        return self._rest is not None

    async def review(self, token: str, audiences: Sequence[str]) -> ReviewResult:
        if self._rest is not None:
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": list(audiences)},
            }
            try:
                answer = await self._rest.call("POST", self.PATH, body)
            except (KubeAPIError, OSError) as exc:  # an error status, refused, reset, timed out
                raise _api_error(exc) from exc
            return _result_from_json(answer.get("status"))
        spec = self._client.V1TokenReviewSpec(token=token, audiences=list(audiences))
        try:
            response = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._api.create_token_review, self._client.V1TokenReview(spec=spec)
            )
        except Exception as exc:  # ApiException, urllib3 and socket errors all mean "try later"
            raise _api_error(exc) from exc
        status = response.status
        if status is None:
            raise UnavailableError("token review failed", detail="TokenReview response has no status")
        user = status.user
        return ReviewResult(
            authenticated=bool(status.authenticated),
            username=(user.username or "") if user else "",
            groups=tuple(user.groups or ()) if user else (),
            extra=dict(user.extra or {}) if user else {},
            audiences=tuple(status.audiences or ()),
            error=status.error or "",
        )

    async def aclose(self) -> None:
        """Close the event-loop connections (the pool's threads end with the process)."""
        if self._rest is not None:
            await self._rest.aclose()


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _result_from_json(status: Any) -> ReviewResult:
    """A ReviewResult from the ``status`` of a TokenReview as JSON (only well-typed fields count:
    anything else reads as absent, which the checks then refuse)."""
    if not isinstance(status, dict):
        raise UnavailableError("token review failed", detail="TokenReview response has no status")
    user = status.get("user")
    user = user if isinstance(user, dict) else {}
    extra = user.get("extra")
    username, error = user.get("username"), status.get("error")
    return ReviewResult(
        authenticated=status.get("authenticated") is True,
        username=username if isinstance(username, str) else "",
        groups=_strings(user.get("groups")),
        extra={k: list(_strings(v)) for k, v in extra.items()} if isinstance(extra, dict) else {},
        audiences=_strings(status.get("audiences")),
        error=error if isinstance(error, str) else "",
    )


def _api_error(exc: Exception) -> CSRServiceError:
    status = api_status(exc)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    if status == 429:
        return ResourceExhaustedError("token review rate-limited; retry later", detail=f"TokenReview: 429 {reason}")
    if status in (401, 403):
        # Our own credentials, not the caller's: an operator must fix RBAC, the client may retry.
        # A restarting apiserver also answers 403 until its authorizer has loaded the RBAC
        # objects (seen in tests/integration/chaos/test_apiserver_restart.py): say both.
        detail = (
            f"TokenReview: {status} {reason}: csr-service's service account needs create on "
            "tokenreviews.authentication.k8s.io (ClusterRole system:auth-delegator), unless the "
            "apiserver has just started (it refuses requests until its authorizer is ready)"
        )
    else:
        detail = f"TokenReview failed: {status or ''} {reason}: {str(exc)[:200]}".replace("  ", " ")
    return UnavailableError("cannot verify the token right now; retry later", detail=detail)


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed review, shared by coalesced callers; each gets a fresh exception from it
    (one exception object raised in many coroutines would collect all their tracebacks)."""

    kind: type[CSRServiceError]
    public: str
    detail: str

    def error(self) -> CSRServiceError:
        return self.kind(self.public, detail=self.detail)


_Outcome = Caller | _Failure


def _fail(public: str, detail: str | None = None) -> _Failure:
    return _Failure(AuthenticationError, f"authentication failed: {public}", detail or public)


def unverified_exp(token: str) -> float | None:
    """The ``exp`` claim of a JWT without verifying anything; None if absent or unreadable.

    Only ever used to *shorten* how long a reviewed token is cached.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = decode_segment(parts[1])
    except ValueError:
        return None
    # Only a sane NumericDate counts: NaN, ±Infinity or 10^30 would break the cache's arithmetic
    # and the date conversion; such a token is then cached for the default TTL at most.
    return numeric_date(payload.get("exp")) if isinstance(payload, dict) else None


class TokenReviewAuthenticator:
    """Authenticates callers with a cached, coalesced TokenReview (see the module docstring)."""

    name = "tokenreview"

    def __init__(
        self,
        reviewer: TokenReviewer,
        *,
        trust_domain: str,
        audiences: Sequence[str] = ("istio-ca",),
        cache_ttl: timedelta = timedelta(minutes=5),
        cache_size: int = 10000,
        negative_ttl: timedelta = NEGATIVE_TTL,
        clock: Callable[[], float] = time.time,
        cluster_id: str | None = None,
    ) -> None:
        self._reviewer = reviewer
        self._cluster_id = cluster_id
        self._trust_domain = trust_domain
        self._audiences = tuple(audiences)
        self._ttl = cache_ttl.total_seconds()
        self._negative_ttl = min(negative_ttl.total_seconds(), self._ttl)
        self._size = cache_size
        # Wall clock, not monotonic: entries are bounded by the token's exp, a wall-clock time.
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, _Outcome]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[_Outcome]] = {}
        #: For tests, logs and metrics (see the module docstring).
        self.stats = {"hits": 0, "misses": 0, "coalesced": 0, "rejected": 0, "api_errors": 0, "evictions": 0}

    async def start(self) -> None:
        """Nothing to start: the first review opens its connection."""

    async def stop(self) -> None:
        """Close the reviewer's connections, if it keeps any."""
        close = getattr(self._reviewer, "aclose", None)
        if close is not None:
            await close()

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) for the metrics: answers without an API call of their own (cache hits
        and coalesced calls), and calls that made a TokenReview."""
        return self.stats["hits"] + self.stats["coalesced"], self.stats["misses"]

    def cache_len(self) -> int:
        """Entries currently cached (positive and negative)."""
        return len(self._cache)

    def recognizes(self, ctx: RequestContext) -> bool:
        """A bearer token is present (see ``--authenticators``)."""
        return ctx.bearer_token() is not None

    async def authenticate(self, ctx: RequestContext) -> Caller:
        token = ctx.bearer_token()
        if token is None:
            raise _fail("no bearer token in the authorization metadata").error()
        if len(token) > MAX_TOKEN_BYTES:
            raise _fail("token too large").error()
        key = hashlib.sha256(token.encode()).digest()
        outcome = self._cached(key)
        if outcome is not None:
            self.stats["hits"] += 1
        else:
            task = self._inflight.get(key)
            if task is not None:
                self.stats["coalesced"] += 1
            else:
                self.stats["misses"] += 1
                task = asyncio.get_running_loop().create_task(self._review(token, key))
                self._inflight[key] = task
                task.add_done_callback(lambda _t: self._inflight.pop(key, None))
            # shield: one caller hitting its deadline must not cancel the review the others await.
            outcome = await asyncio.shield(task)
        if isinstance(outcome, _Failure):
            raise outcome.error()
        return outcome

    def _cached(self, key: bytes) -> _Outcome | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, outcome = entry
        if self._clock() >= expires:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return outcome

    def _remember(self, key: bytes, outcome: _Outcome, ttl: float) -> None:
        if ttl <= 0:
            return
        self._cache[key] = (self._clock() + ttl, outcome)
        self._cache.move_to_end(key)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
            self.stats["evictions"] += 1

    async def _review(self, token: str, key: bytes) -> _Outcome:
        started = time.perf_counter()
        try:
            result = await self._reviewer.review(token, self._audiences)
        except CSRServiceError as exc:
            self.stats["api_errors"] += 1
            # Not cached: the next call tries the apiserver again.
            return _Failure(type(exc), exc.public, exc.detail)
        outcome = self._check(result)
        exp = unverified_exp(token)
        if isinstance(outcome, _Failure):
            self.stats["rejected"] += 1
            ttl = self._negative_ttl
        else:
            ttl = self._ttl if exp is None else min(self._ttl, exp - self._clock())
            if exp is not None:
                outcome = _with_expiry(outcome, exp)
        self._remember(key, outcome, ttl)
        log.debug(
            "tokenreview: %s took_ms=%.1f cached_s=%d",
            outcome.detail if isinstance(outcome, _Failure) else f"identity={outcome.identity}",
            (time.perf_counter() - started) * 1000,
            max(0, int(ttl)),
        )
        return outcome

    def _check(self, r: ReviewResult) -> _Outcome:
        if not r.authenticated:
            return _fail("token not accepted by the Kubernetes API", f"TokenReview: not authenticated: {r.error[:300]}")
        if not set(r.audiences) & set(self._audiences):
            return _fail(
                "token audience not accepted",
                f"TokenReview audiences {list(r.audiences)} share none of {list(self._audiences)}",
            )
        if SERVICE_ACCOUNTS_GROUP not in r.groups:
            return _fail("token is not a Kubernetes service-account token", f"groups {list(r.groups)[:10]}")
        try:
            ns, sa = service_account_from_username(r.username)
        except ValueError as exc:
            return _fail("token is not a Kubernetes service-account token", f"username {r.username[:100]!r}: {exc}")
        return Caller(
            identity=SpiffeId(self._trust_domain, ns, sa),
            pod_name=_first(r.extra.get(POD_NAME_KEY)),
            pod_uid=_first(r.extra.get(POD_UID_KEY)),
            authenticator=self.name,
            cluster_id=self._cluster_id,
        )


def _first(values: Sequence[str] | None) -> str | None:
    return values[0] if values and isinstance(values[0], str) else None


def _with_expiry(caller: Caller, exp: float) -> Caller:
    return replace(caller, token_expires_at=datetime.fromtimestamp(exp, UTC))


class MultiClusterTokenReview:
    """TokenReview in the apiserver of the caller's cluster (``--multicluster-secrets``).

    The ``clusterid`` metadata picks the cluster (none: the local one); an id that is neither
    the local cluster's nor a known remote's is refused before any API call. Each cluster has
    its own :class:`TokenReviewAuthenticator`: its own cache (a token is only ever remembered as
    valid for the cluster that reviewed it, so a token of cluster B sent as cluster A is
    reviewed by A, which refuses it), its own connections and rate limit (its client's), and
    its own failures: an apiserver that is down makes only its workloads retry. A cluster whose
    kubeconfig changes gets a fresh authenticator (the cache of the old credentials is dropped).
    """

    name = "tokenreview"

    def __init__(self, clusters: ClusterSet, build: Callable[[Cluster], TokenReviewAuthenticator]) -> None:
        self._clusters = clusters
        self._build = build
        self._per_cluster: dict[str, tuple[Cluster, TokenReviewAuthenticator]] = {}
        #: Cache totals of authenticators already dropped, so the metrics' counters never go back.
        self._retired: dict[str, tuple[int, int]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        clusters.add_listener(self._on_change)

    def recognizes(self, ctx: RequestContext) -> bool:
        """A bearer token is present (see ``--authenticators``)."""
        return ctx.bearer_token() is not None

    async def authenticate(self, ctx: RequestContext) -> Caller:
        claimed = ctx.metadata.get("clusterid", "")
        cluster = self._clusters.get(claimed)
        if cluster is None:
            raise AuthenticationError(
                f"client claims to be in cluster {claimed[:64]!r}, which this CA does not serve",
                detail=f"clusterid {claimed[:64]!r} is neither --cluster-id nor a remote cluster; no TokenReview made",
            )
        return await self._authenticator(cluster).authenticate(ctx)

    def _authenticator(self, cluster: Cluster) -> TokenReviewAuthenticator:
        entry = self._per_cluster.get(cluster.cluster_id)
        if entry is not None and entry[0] is cluster:
            return entry[1]
        authn = self._build(cluster)
        self._per_cluster[cluster.cluster_id] = (cluster, authn)
        if entry is not None:
            self._retire(cluster.cluster_id, entry[1])
        return authn

    def _on_change(self, event: str, cluster: Cluster) -> None:
        entry = self._per_cluster.get(cluster.cluster_id)
        if event == "removed" and entry is not None and entry[0] is cluster:
            del self._per_cluster[cluster.cluster_id]
            self._retire(cluster.cluster_id, entry[1])

    def _retire(self, cluster_id: str, authn: TokenReviewAuthenticator) -> None:
        hits, misses = authn.cache_stats()
        old_hits, old_misses = self._retired.get(cluster_id, (0, 0))
        self._retired[cluster_id] = (old_hits + hits, old_misses + misses)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing was opened
            task = asyncio.get_running_loop().create_task(authn.stop())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def cluster_stats(self) -> dict[str, dict[str, int]]:
        """Per cluster id, the counters of its :class:`TokenReviewAuthenticator` (for tests, benchmarks)."""
        return {cid: dict(authn.stats) for cid, (_, authn) in self._per_cluster.items()}

    def cluster_cache_stats(self) -> dict[str, tuple[int, int]]:
        """(hits, misses) per cluster id since start, including authenticators already replaced."""
        totals = dict(self._retired)
        for cid, (_, authn) in self._per_cluster.items():
            h, m = authn.cache_stats()
            old_h, old_m = totals.get(cid, (0, 0))
            totals[cid] = (old_h + h, old_m + m)
        return totals

    def cache_stats(self) -> tuple[int, int]:
        per_cluster = self.cluster_cache_stats().values()
        return sum(h for h, _ in per_cluster), sum(m for _, m in per_cluster)

    async def start(self) -> None:
        """Nothing to start: each cluster's first review opens its connection."""

    async def stop(self) -> None:
        entries = list(self._per_cluster.values())
        self._per_cluster.clear()
        for _, authn in entries:
            await authn.stop()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def create(values: Mapping[str, Any], runtime: Runtime) -> TokenReviewAuthenticator | MultiClusterTokenReview:
    """``--authenticator tokenreview``: reviews through ``runtime.kube()`` (needs create on
    tokenreviews), or, with remote clusters, through the client of the caller's cluster."""
    settings = TokenReviewSettings.from_values(values)

    def build(api: Any, cluster_id: str | None) -> TokenReviewAuthenticator:
        return TokenReviewAuthenticator(
            KubeTokenReviewer(api),
            trust_domain=runtime.trust_domain,
            audiences=settings.audiences,
            cache_ttl=settings.cache_ttl,
            cache_size=settings.cache_size,
            cluster_id=cluster_id,
        )

    if runtime.clusters is not None:
        return MultiClusterTokenReview(runtime.clusters, lambda cluster: build(cluster.client(), cluster.cluster_id))
    return build(runtime.kube(), None)
