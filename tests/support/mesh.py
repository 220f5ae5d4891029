"""A fleet of simulated istio-agents, for storms and chaos tests (and ``bench/storm.py``).

One :class:`Agent` asks for its workload's certificate the way istio-agent does when its pod
starts (istio.io/istio ``security/pkg/nodeagent/sds/sdsservice.go``,
``caclient/providers/citadel/client.go``, ``pkg/security/retry.go``; PROTOCOL.md):

- one gRPC connection of its own over TLS, verifying csr-service's serving certificate against
  the mesh root; ``CreateCertificate`` with its own token (``authorization: Bearer``), the
  ``clusterid`` metadata and ``{"CertSigner": ""}``;
- **inner retries** (the citadel client's interceptor): at most 5 attempts, only on CANCELLED,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL and UNAVAILABLE, waiting
  ``100 ms * 2^attempt`` ± 10 % before attempt 1..4 (200, 400, 800, 1600 ms);
- **outer loop** (the SDS warm-up): when the inner retries give up, or on any other code, the
  connection is rebuilt (``CitadelClient.reconnect``) and the request made again, forever, with
  exponential backoff from 0.5 s, x1.5, ± 50 %, at most 60 s.

Differences, on purpose: istio-agent sends no deadline; an agent here gives each call
``call_timeout`` so that a hang shows up as a recorded ``DEADLINE_EXCEEDED`` ("client
deadline") instead of a stuck test. The key and CSR are made before the clock starts (one
fresh key per workload, never shared, reused on outer retries): on a real mesh they are made on
each workload's own node, not on the CA's cores, which this machine would otherwise share.

Every call is recorded as an :class:`Attempt`, so a test can assert on codes (retryable only)
and a benchmark can count them. :func:`storm` runs many agents once (a mesh restart);
:class:`BackgroundLoad` keeps agents asking again and again in a thread of its own while the
test's main thread breaks things (peers must be started from the main thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from google.protobuf import struct_pb2

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, PrivateKey, generate_key

__all__ = [
    "NON_RETRYABLE_EXAMPLES",
    "RETRYABLE",
    "Agent",
    "Attempt",
    "BackgroundLoad",
    "FleetReport",
    "Outcome",
    "Workload",
    "make_workloads",
    "percentile",
    "storm",
]

#: The codes istio-agent's CA client retries (pkg/security/retry.go CARetryOptions).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED.name,
        grpc.StatusCode.DEADLINE_EXCEEDED.name,
        grpc.StatusCode.RESOURCE_EXHAUSTED.name,
        grpc.StatusCode.ABORTED.name,
        grpc.StatusCode.INTERNAL.name,
        grpc.StatusCode.UNAVAILABLE.name,
    }
)
#: For messages: what a workload must never see because of an outage.
NON_RETRYABLE_EXAMPLES = ("UNAUTHENTICATED", "INVALID_ARGUMENT", "PERMISSION_DENIED", "FAILED_PRECONDITION")

INNER_ATTEMPTS = 5
INNER_SCALAR = 0.1
INNER_JITTER = 0.1
OUTER_INITIAL = 0.5
OUTER_MULTIPLIER = 1.5
OUTER_RANDOMIZATION = 0.5
OUTER_MAX = 60.0
#: How a client-side timeout is told apart from a DEADLINE_EXCEEDED the server sent.
CLIENT_DEADLINE = "client deadline"


def inner_backoff(attempt: int, rng: random.Random) -> float:
    """grpc_retry's BackoffExponentialWithJitter(100ms, 0.1) before ``attempt`` (1-based)."""
    base = INNER_SCALAR * 2**attempt
    return base * (1 + INNER_JITTER * (rng.random() * 2 - 1))


class OuterBackoff:
    """istio's pkg/backoff defaults (cenkalti/backoff): 0.5 s, x1.5, ± 50 %, capped at 60 s."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._interval = OUTER_INITIAL

    def next(self) -> float:
        delta = OUTER_RANDOMIZATION * self._interval
        wait = self._interval - delta + self._rng.random() * 2 * delta
        self._interval = min(self._interval * OUTER_MULTIPLIER, OUTER_MAX)
        return wait


@dataclass(frozen=True)
class Workload:
    """One pod's service account, its token and its (fresh, own) key and CSR."""

    namespace: str
    service_account: str
    token: str
    key: PrivateKey = field(repr=False)
    csr_pem: str = field(repr=False)
    trust_domain: str = "cluster.local"

    @property
    def identity(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def make_workloads(
    accounts: Iterable[tuple[str, str, str]],
    *,
    key_type: KeyType = KeyType.EC_P256,
    trust_domain: str = "cluster.local",
) -> list[Workload]:
    """A workload (fresh key and CSR for its identity) per ``(namespace, service account, token)``."""
    out = []
    for ns, sa, token in accounts:
        key = generate_key(key_type)
        uri = f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
        csr = build_csr(key, uris=(uri,)).public_bytes(serialization.Encoding.PEM).decode()
        out.append(Workload(ns, sa, token, key, csr, trust_domain))
    return out


@dataclass(frozen=True)
class Attempt:
    """One CreateCertificate call: when it started (s since the fleet's start), how long it
    took, and its outcome (``OK`` or a gRPC status name)."""

    started: float
    seconds: float
    code: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


@dataclass
class Outcome:
    """What one agent went through: every attempt, and the certificate chain it got."""

    workload: Workload
    attempts: list[Attempt] = field(default_factory=list)
    chain: list[str] | None = None
    #: Seconds since the fleet's start when the certificate arrived.
    done_at: float | None = None

    def problems(self, roots: Sequence[x509.Certificate]) -> list[str]:
        """What is wrong with the certificate this workload got (empty: nothing). Checked with
        cryptography alone (its X.509 path validation), not with csr-service's own code."""
        who = self.workload.identity
        if self.chain is None:
            return [f"{who}: no certificate"]
        if len(self.chain) < 2:
            return [f"{who}: chain has {len(self.chain)} element(s)"]
        leaf = x509.load_pem_x509_certificate(self.chain[0].encode())
        issues = []
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if uris != [who]:
            issues.append(f"{who}: certificate names {uris}")
        if _spki(leaf.public_key()) != _spki(self.workload.key.public_key()):
            issues.append(f"{who}: certificate is not for the workload's key")
        if x509.load_pem_x509_certificates(self.chain[-1].encode()) != list(roots):
            issues.append(f"{who}: the last element is not the root bundle")
        intermediates = [c for pem in self.chain[1:-1] for c in x509.load_pem_x509_certificates(pem.encode())]
        try:
            # The client policy: it accepts a leaf named only by a URI, as SPIFFE leaves are.
            PolicyBuilder().store(Store(list(roots))).build_client_verifier().verify(leaf, intermediates)
        except VerificationError as exc:
            issues.append(f"{who}: chain does not verify: {exc}")
        return issues


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


class Agent:
    """One workload's istio-agent (see the module docstring)."""

    def __init__(
        self,
        workload: Workload,
        target: str,
        root_pem: bytes,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        call_timeout: float = 30.0,
        cluster_id: str = "Kubernetes",
        server_name: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.workload = workload
        self._sleep = sleep
        self.outcome = Outcome(workload)
        self._target = target
        self._credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
        self._clock = clock
        self._rng = rng
        self._timeout = call_timeout
        self._metadata = (("authorization", f"Bearer {workload.token}"), ("clusterid", cluster_id))
        struct = struct_pb2.Struct()
        struct.update({"CertSigner": ""})
        self._request = ca_pb2.IstioCertificateRequest(csr=workload.csr_pem, validity_duration=3600, metadata=struct)
        # A pool of its own: gRPC would otherwise share one connection among all agents'
        # channels with the same target and arguments; every istio-agent has its own.
        self._options: list[tuple[str, Any]] = [("grpc.use_local_subchannel_pool", 1)]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
        return ca_pb2_grpc.IstioCertificateServiceStub(self._channel)  # type: ignore[no-untyped-call]

    async def _reconnect(self) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _call(self) -> list[str] | None:
        started = self._clock()
        t0 = time.perf_counter()
        try:
            response = await self._stub().CreateCertificate(
                self._request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            detail = exc.details() or ""
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "request id" not in detail:
                detail = f"{CLIENT_DEADLINE}: {detail}"
            self.outcome.attempts.append(Attempt(started, time.perf_counter() - t0, exc.code().name, detail))
            return None
        chain = list(response.cert_chain)
        if len(chain) <= 1:  # what the citadel client refuses ("invalid empty CertChain")
            self.outcome.attempts.append(Attempt(started, time.perf_counter() - t0, "EMPTY_CHAIN"))
            return None
        self.outcome.attempts.append(Attempt(started, time.perf_counter() - t0, "OK"))
        return chain

    async def _sign(self) -> list[str] | None:
        """The citadel client's CSRSign: the call with its inner retries."""
        for attempt in range(INNER_ATTEMPTS):
            if attempt:
                await self._sleep(inner_backoff(attempt, self._rng))
            chain = await self._call()
            if chain is not None:
                return chain
            if self.outcome.attempts[-1].code not in RETRYABLE:
                break
        await self._reconnect()
        return None

    async def certificate(self, until: float = float("inf")) -> list[str] | None:
        """Ask until a certificate arrives (the SDS warm-up loop), or until the fleet's clock
        passes ``until``; returns the chain, or None when it gave up."""
        backoff = OuterBackoff(self._rng)
        while True:
            chain = await self._sign()
            if chain is not None:
                self.outcome.chain, self.outcome.done_at = chain, self._clock()
                return chain
            wait = backoff.next()
            if self._clock() + wait > until:
                return None
            await self._sleep(wait)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, min(998, round(q * 10) - 1))]


@dataclass
class FleetReport:
    """What a fleet of agents went through."""

    outcomes: list[Outcome]
    #: Seconds from the start until the last certificate arrived (or the fleet gave up).
    elapsed: float

    @property
    def attempts(self) -> list[Attempt]:
        return [a for o in self.outcomes for a in o.attempts]

    def failures(self) -> Counter[str]:
        """Failed calls by code."""
        return Counter(a.code for a in self.attempts if not a.ok)

    def non_retryable(self) -> list[tuple[str, Attempt]]:
        """``(identity, attempt)`` for every call that failed with a code istio-agent does not retry."""
        return [(o.workload.identity, a) for o in self.outcomes for a in o.attempts if not a.ok and not a.retryable]

    def client_deadlines(self) -> list[tuple[str, Attempt]]:
        """Calls that got no answer within the agent's own timeout (a hang, not an answer)."""
        return [(o.workload.identity, a) for o in self.outcomes for a in o.attempts if CLIENT_DEADLINE in a.detail]

    def without_certificate(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.chain is None]

    def problems(self, roots: Sequence[x509.Certificate]) -> list[str]:
        """Every workload must hold a certificate for its own identity and key, chaining to ``roots``."""
        return [p for o in self.outcomes for p in o.problems(roots)]

    def time_to_certificate(self) -> list[float]:
        return sorted(o.done_at for o in self.outcomes if o.done_at is not None)

    def call_latencies(self) -> list[float]:
        """Seconds each successful call took."""
        return sorted(a.seconds for a in self.attempts if a.ok)

    def summary(self) -> str:
        ttc, calls = self.time_to_certificate(), self.call_latencies()
        got = len(ttc)
        return (
            f"{got}/{len(self.outcomes)} certificates, last after {self.elapsed:.1f} s; "
            f"time to certificate p50 {percentile(ttc, 50):.2f} s p99 {percentile(ttc, 99):.2f} s; "
            f"successful calls p50 {percentile(calls, 50) * 1000:.0f} ms p99 {percentile(calls, 99) * 1000:.0f} ms; "
            f"calls {len(self.attempts)}, failed by code {dict(self.failures()) or '{}'}"
        )


async def storm(
    workloads: Sequence[Workload],
    target: str,
    root_pem: bytes,
    *,
    ramp: float = 0.0,
    give_up_after: float = 120.0,
    call_timeout: float = 30.0,
    seed: int = 0,
    server_name: str | None = None,
) -> FleetReport:
    """Every workload asks for its first certificate once, starting at a random moment within
    ``ramp`` seconds (0: all at once), retrying like istio-agent until ``give_up_after``."""
    rng = random.Random(seed)
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    agents = [
        Agent(w, target, root_pem, clock=clock, rng=random.Random(rng.random()), call_timeout=call_timeout,
              server_name=server_name)
        for w in workloads
    ]  # fmt: skip

    async def run(agent: Agent, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await agent.certificate(until=give_up_after)
        finally:
            await agent.close()

    await asyncio.gather(*(run(a, rng.random() * ramp) for a in agents))
    done = [a.outcome.done_at for a in agents if a.outcome.done_at is not None]
    elapsed = max(done) if len(done) == len(agents) else clock()
    return FleetReport([a.outcome for a in agents], elapsed)


class BackgroundLoad:
    """Agents asking for certificates over and over, in a thread with its own event loop.

    Each agent keeps its connection between certificates (as istio-agent does between
    rotations) and asks again ``pause`` seconds after each certificate. Use as a context
    manager; :attr:`report` holds everything once it has stopped. Calls cut short by the
    stop itself are not recorded.
    """

    def __init__(
        self,
        workloads: Sequence[Workload],
        target: str,
        root_pem: bytes,
        *,
        pause: float = 0.1,
        call_timeout: float = 30.0,
        seed: int = 0,
    ) -> None:
        self._workloads = list(workloads)
        self._target = target
        self._root_pem = root_pem
        self._pause = pause
        self._timeout = call_timeout
        self._seed = seed
        self._t0 = time.monotonic()
        self._agents: list[Agent] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="background-load", daemon=True)
        self._started = threading.Event()
        self.certificates = 0
        self.report: FleetReport | None = None

    def now(self) -> float:
        """The load's clock (seconds since it was created), as recorded in attempts."""
        return time.monotonic() - self._t0

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        rng = random.Random(self._seed)
        self._agents = [
            Agent(w, self._target, self._root_pem, clock=self.now, rng=random.Random(rng.random()),
                  call_timeout=self._timeout)
            for w in self._workloads
        ]  # fmt: skip
        self._started.set()
        tasks = [asyncio.create_task(self._keep_asking(a)) for a in self._agents]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for agent in self._agents:
            await agent.close()
        self.report = FleetReport([a.outcome for a in self._agents], self.now())

    async def _keep_asking(self, agent: Agent) -> None:
        while True:
            if await agent.certificate() is not None:
                self.certificates += 1
            await asyncio.sleep(self._pause)

    def wait_for_certificates(self, more: int, timeout: float = 60.0) -> None:
        """Block until ``more`` certificates beyond the current count have been issued."""
        target = self.certificates + more
        deadline = time.monotonic() + timeout
        while self.certificates < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.certificates} of {target} certificates after {timeout}s")
            time.sleep(0.05)

    def attempts(self) -> list[Attempt]:
        """Every call made so far (a snapshot, safe to read while the load runs)."""
        return [a for agent in self._agents for a in list(agent.outcome.attempts)]

    def wait_for_failures(self, count: int, since: float, timeout: float = 60.0) -> None:
        """Block until ``count`` calls started after ``since`` have failed (an outage is felt)."""
        deadline = time.monotonic() + timeout
        while sum(1 for a in self.attempts() if not a.ok and a.started >= since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} failed calls since {since:.1f}s after {timeout}s")
            time.sleep(0.05)

    def wait_until_each_certified(self, since: float, timeout: float = 60.0) -> None:
        """Block until every agent has got a certificate from a call started after ``since``
        (the load's clock): none is stuck, e.g. on a dead connection."""
        deadline = time.monotonic() + timeout

        def certified(agent: Agent) -> bool:
            return any(a.ok and a.started >= since for a in list(agent.outcome.attempts))

        while not all(certified(a) for a in self._agents):
            if time.monotonic() > deadline:
                stuck = [a.workload.identity for a in self._agents if not certified(a)]
                raise TimeoutError(f"{len(stuck)} agent(s) without a certificate after {timeout}s: {stuck[:5]}")
            time.sleep(0.05)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        self._started.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


async def provision_accounts(
    configuration: Any,
    count: int,
    *,
    prefix: str,
    per_namespace: int = 100,
    concurrency: int = 64,
    audiences: Sequence[str] = ("istio-ca",),
    expiration_seconds: int = 7200,
) -> list[tuple[str, str, str]]:
    """Create ``count`` ServiceAccounts (``per_namespace`` in each of the namespaces
    ``<prefix>-<n>``) and mint a token for each through TokenRequest, ``concurrency`` API calls
    at a time; returns ``(namespace, service account, token)`` in creation order.

    ``configuration`` is an admin ``kubernetes.client.Configuration`` (``KubeCluster.api_client
    .configuration``). The calls go out from one event loop (csr-service's own async REST
    client): the ``kubernetes`` client's per-call cost would make 20,000 calls take minutes.
    """
    from csr_service.kube.rest import KubeAPIError, KubeREST

    rest = KubeREST(configuration, bucket=None, timeout=60.0)
    gate = asyncio.Semaphore(concurrency)
    namespaces = [f"{prefix}-{n}" for n in range((count + per_namespace - 1) // per_namespace)]
    accounts = [(namespaces[i // per_namespace], f"sa-{i % per_namespace}") for i in range(count)]

    async def call(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            for attempt in range(5):  # a busy apiserver may answer 429 / time out: try again
                try:
                    return await rest.call(method, path, body)
                except (ConnectionError, TimeoutError, KubeAPIError) as exc:
                    busy = not isinstance(exc, KubeAPIError) or exc.status in (429, 500, 503, 504)
                    if attempt == 4 or not busy:
                        raise
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def token(ns: str, sa: str) -> str:
        await call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": sa}})
        spec = {"audiences": list(audiences), "expirationSeconds": expiration_seconds}
        answer = await call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", {"spec": spec})
        return str(answer["status"]["token"])

    try:
        await asyncio.gather(*(call("POST", "/api/v1/namespaces", {"metadata": {"name": ns}}) for ns in namespaces))
        tokens = await asyncio.gather(*(token(ns, sa) for ns, sa in accounts))
    finally:
        await rest.aclose()
    return [(ns, sa, tok) for (ns, sa), tok in zip(accounts, tokens, strict=True)]
