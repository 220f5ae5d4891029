"""The loop that keeps one output's certificate fresh.

Each round (every ``check_interval`` at most, sooner when a renewal or a retry is due) asks:
did the root file change? is the output still what we wrote (deleted, tampered with)? is the
renewal time reached? Any "yes" gets a new key and certificate from the CA, written to the
output in one step. A failure changes nothing on the output: the current certificate stays
(it is still valid, or nothing better exists), the failure is logged and counted by code, and
the attempt is repeated after a capped exponential backoff, or at once when the root changes.

At start (and when a Secret writer becomes leader) the certificate already in the output is
adopted if it is whole and valid for our identity: a restarted agent or a new leader does not
replace a good certificate early.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from csr_service.agent.ca import CAClient
from csr_service.agent.outputs import Output, Rendering
from csr_service.agent.schedule import Backoff, Clock, SystemClock, renewal_time
from csr_service.client import Issued, RequestError, check_response
from csr_service.common.lifecycle import BackgroundTask
from csr_service.common.readiness import Check
from csr_service.infra import metrics
from csr_service.pki.pem import load_private_key, parse_certs

__all__ = ["Current", "Policy", "Rotator", "adopt"]

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
AfterWrite = Callable[[str, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Policy:
    renew_at: float = 0.5
    jitter: float = 0.1
    check_interval: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


@dataclass(frozen=True, slots=True)
class Current:
    """The certificate in the output: what we wrote (or adopted) and when to renew it."""

    leaf: x509.Certificate
    rendering: Mapping[str, bytes]
    renew_at: datetime
    root_generation: int

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc


def adopt(
    found: Rendering, render: Callable[[Issued], dict[str, bytes]], identity: str, now: datetime
) -> Issued | None:
    """The certificate in ``found`` if it is whole, consistent, for ``identity`` and valid now."""
    try:
        key = load_private_key(found["key.pem"])
        chain = [c.public_bytes(Encoding.PEM).decode() for c in parse_certs(found["cert-chain.pem"])]
        root = found["root-cert.pem"].decode()
        issued = check_response([*chain, root], identity, key, now=now)
    except (KeyError, ValueError, RequestError):
        return None
    # Every name must hold what we would have written (tls.crt == cert-chain.pem, ...).
    return issued if render(issued) == dict(found) else None


class Rotator:
    """Keeps ``output`` supplied from ``ca``; a Component (``start``/``stop``) for the leader elector."""

    all_workers = True

    def __init__(
        self,
        output: Output,
        ca: CAClient,
        policy: Policy,
        *,
        after_write: AfterWrite | None = None,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
        rand: Callable[[], float] | None = None,
    ) -> None:
        import random

        self.output = output
        self.name = f"rotator {output.name}"
        self._ca = ca
        self._policy = policy
        self._after_write = after_write
        self._clock = clock or SystemClock()
        self._sleep = sleep or asyncio.sleep
        self._rand = rand or random.random
        self._backoff = Backoff(policy.backoff_initial, policy.backoff_max, rand=self._rand)
        self.current: Current | None = None
        self.last_error: RequestError | None = None
        self._pending: str | None = None  # the reason of a failed attempt, retried at _retry_at
        self._retry_at = 0.0
        self._task = BackgroundTask(self.name, self.run, logger=log)
        #: Certificates written, and the reasons of the latest writes (for tests and benches).
        self.rotations = 0
        self.history: deque[str] = deque(maxlen=32)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the loop (afresh after a stop: a new leader re-reads the output)."""
        if not self._task.running:
            self.current, self._pending = None, None
            self._backoff.reset()
            self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    # --- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Adopt what is there, then rotate forever (cancel to stop)."""
        await self._adopt()
        await self.loop()

    async def loop(self) -> None:
        """Rotate forever, from the state there is (tests resume it after a pause)."""
        while True:
            reason = await self.due()
            if reason is not None:
                await self.attempt(reason)
            await self._sleep(self.next_delay())

    async def _adopt(self) -> None:
        self._ca.root_changed()
        try:
            found = await self.output.read()
        except RequestError as exc:
            log.warning("%s: cannot read the output at start (%s); a new certificate will be written", self.name, exc)
            return
        if found is None:
            return
        now = self._clock.now()
        issued = adopt(found, self.output.render, self._ca.identity, now)
        if issued is None:
            log.info("%s: what is there is not a valid certificate for %s; replacing it", self.name, self._ca.identity)
            return
        self.current = self._current(issued, received_at=None)
        log.info(
            "%s: kept the certificate already there (valid until %s, renewal at %s)",
            self.name,
            _ts(self.current.not_after),
            _ts(self.current.renew_at),
        )

    async def due(self) -> str | None:
        """Why a new certificate is needed now, or None."""
        mono = self._clock.monotonic()
        if self._ca.root_changed():
            self._retry_at = mono  # a new root may be what the failing attempts needed: no backoff
            return "root-changed"
        if self._pending is not None:
            return self._pending if mono >= self._retry_at else None
        if self.current is None:
            return "initial"
        if self.current.root_generation != self._ca.root_generation:
            return "root-changed"
        try:
            found = await self.output.read()
        except RequestError as exc:
            log.warning("%s: cannot check the output: %s", self.name, exc)
            found = self.current.rendering  # unknown: judge by time alone
        if found is None:
            return "deleted"
        if dict(found) != dict(self.current.rendering):
            return "tampered"
        if self._clock.now() >= self.current.renew_at:
            return "renewal"
        return None

    def next_delay(self) -> float:
        delay = self._policy.check_interval
        if self._pending is not None:
            delay = min(delay, self._retry_at - self._clock.monotonic())
        elif self.current is not None:
            delay = min(delay, (self.current.renew_at - self._clock.now()).total_seconds())
        return max(delay, 0.0)

    async def attempt(self, reason: str) -> bool:
        """Get a certificate and write it; on failure keep what is there and schedule a retry."""
        generation = self._ca.root_generation
        try:
            issued = await self._ca.issue()
            await self.output.write(issued)
        except RequestError as exc:
            self._failed(reason, exc)
            return False
        self.current = self._current(issued, received_at=self._clock.now(), generation=generation)
        self._pending, self.last_error = None, None
        self._backoff.reset()
        self.history.append(reason)
        self.rotations += 1
        metrics.agent_rotated(self.output.name, reason, self.current.not_after, self.current.renew_at)
        log.info(
            "%s: wrote a certificate for %s (%s; valid until %s, renewal at %s)",
            self.name,
            self._ca.identity,
            reason,
            _ts(self.current.not_after),
            _ts(self.current.renew_at),
        )
        if self._after_write is not None:
            await self._after_write(self.output.name, {"CSR_SERVICE_AGENT_OUTPUT": self.output.name})
        return True

    def _failed(self, reason: str, exc: RequestError) -> None:
        self.last_error = exc
        self._pending = reason
        delay = self._backoff.next()
        self._retry_at = self._clock.monotonic() + delay
        metrics.agent_failed(self.output.name, exc.code)
        if self.current is not None and self._clock.now() < self.current.not_after:
            keeping = f"keeping the current certificate (valid until {_ts(self.current.not_after)})"
        elif self.current is not None:
            keeping = f"the current certificate EXPIRED at {_ts(self.current.not_after)}"
        else:
            keeping = "no certificate written yet"
        log.warning(
            "%s: %s failed: %s: %s; %s; retry %d in %.1fs",
            self.name,
            reason,
            exc.code,
            exc.message,
            keeping,
            self._backoff.failures,
            delay,
        )

    def _current(self, issued: Issued, *, received_at: datetime | None, generation: int | None = None) -> Current:
        leaf = issued.leaf
        renew = renewal_time(
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            received_at=received_at,
            renew_at=self._policy.renew_at,
            jitter=self._policy.jitter,
            rand=self._rand,
        )
        return Current(
            leaf=leaf,
            rendering=self.output.render(issued),
            renew_at=renew,
            root_generation=self._ca.root_generation if generation is None else generation,
        )

    # --- readiness ---------------------------------------------------------------------------
    def check(self) -> Check:
        """Ready while the output holds a certificate that has not expired."""
        failing = f"; renewal failing: {self.last_error}" if self.last_error else ""
        cur = self.current
        if cur is None:
            return Check(self.output.name, False, f"no certificate written yet{failing}")
        if self._clock.now() >= cur.not_after:
            return Check(self.output.name, False, f"certificate expired at {_ts(cur.not_after)}{failing}")
        return Check(
            self.output.name, True, f"valid until {_ts(cur.not_after)}, renewal at {_ts(cur.renew_at)}{failing}"
        )


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
