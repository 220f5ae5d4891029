"""The agent's timing and rotation logic with a fake clock: when it renews, how it backs off,
that a failure keeps the certificate it has, and what makes it rotate early (root change,
deleted or tampered output). The CA here is in memory and signs with the test oracle's PKI;
the real CAs are in tests/e2e/test_agent.py (serve --dev) and tests/integration (istiod)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from csr_service.agent.rotator import Policy, Rotator
from csr_service.agent.schedule import Backoff, renewal_time
from csr_service.agent.settings import token_identity
from csr_service.client import Issued, RequestError, check_response, new_csr, workload_files
from csr_service.pki.keys import KeyType
from tests.support import pki

ID = "spiffe://cluster.local/ns/apps/sa/prom"
ROOT = pki.make_ca("agent test root")
#: The fake clock's zero: within the test root's validity.
T0 = dt.datetime.now(dt.UTC).replace(microsecond=0)


class _Stop(Exception):
    pass


@dataclass
class FakeClock:
    t: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    horizon: float = 3600.0

    def now(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.t)

    def monotonic(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        if self.t > self.horizon:
            raise _Stop


@dataclass
class FakeCA:
    """Signs ``lifetime``-long leaves backdated 2 minutes (as Istio's CA does); ``down`` makes
    calls fail with UNAVAILABLE; ``root_change()`` simulates the root file changing."""

    clock: FakeClock
    lifetime: dt.timedelta = dt.timedelta(minutes=10)
    down: bool = False
    identity: str = ID
    root_generation: int = 1
    calls: list[float] = field(default_factory=list)
    _changed: bool = False

    def root_changed(self) -> bool:
        changed, self._changed = self._changed, False
        return changed

    def root_change(self) -> None:
        self._changed = True
        self.root_generation += 1

    async def issue(self) -> Issued:
        self.calls.append(self.clock.t)
        if self.down:
            raise RequestError("UNAVAILABLE", "CA down")
        key, _ = new_csr(ID, KeyType.EC_P256)
        now = self.clock.now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ROOT.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=2))
            .not_valid_after(now + self.lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), critical=True)
            .sign(ROOT.key, hashes.SHA256())
        )
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        return check_response([pem, pki.certs_pem(ROOT.cert)], ID, key, now=now)


@dataclass
class MemoryOutput:
    name: str = "memory"
    stored: dict[str, bytes] | None = None
    fail_writes: bool = False
    writes: int = 0

    def render(self, issued: Issued) -> dict[str, bytes]:
        return {n: c for n, (c, _) in workload_files(issued).items()}

    async def read(self) -> dict[str, bytes] | None:
        return None if self.stored is None else dict(self.stored)

    async def write(self, issued: Issued) -> None:
        if self.fail_writes:
            raise RequestError("OUTPUT_ERROR", "read-only")
        self.stored = self.render(issued)
        self.writes += 1


def _rotator(
    clock: FakeClock, ca: FakeCA, out: MemoryOutput, *, rand: Callable[[], float] = lambda: 0.0, **policy: float
) -> Rotator:
    return Rotator(out, ca, Policy(**{"check_interval": 10.0, **policy}), clock=clock, sleep=clock.sleep, rand=rand)  # type: ignore[arg-type]


def _run(rotator: Rotator) -> None:
    """Run (the first time) or resume the rotator until the clock passes its horizon."""
    with pytest.raises(_Stop):
        asyncio.run(rotator.run() if not rotator.history and rotator.last_error is None else rotator.loop())


# --- pure timing ---------------------------------------------------------------------------------
def test_renewal_counts_from_receipt_not_from_a_backdated_not_before() -> None:
    nb, na = T0 - dt.timedelta(minutes=2), T0 + dt.timedelta(minutes=1)
    # From NotBefore, 50 % of a 3-minute span lies 30 s in the past: a renewal loop.
    assert renewal_time(nb, na, received_at=None, renew_at=0.5, jitter=0) == T0 - dt.timedelta(seconds=30)
    assert renewal_time(nb, na, received_at=T0, renew_at=0.5, jitter=0) == T0 + dt.timedelta(seconds=30)


@pytest.mark.parametrize(("rand", "expected_s"), [(0.0, 50.0), (0.999999, 45.0), (0.5, 47.5)])
def test_jitter_only_renews_earlier(rand: float, expected_s: float) -> None:
    when = renewal_time(T0, T0 + dt.timedelta(seconds=100), received_at=T0, renew_at=0.5, jitter=0.1, rand=lambda: rand)
    assert abs((when - T0).total_seconds() - expected_s) < 1e-3


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(1.0, 60.0, rand=lambda: 1.0)  # the top of each jitter range
    assert [b.next() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    b.reset()
    assert b.next() == 1
    low = Backoff(1.0, 60.0, rand=lambda: 0.0)
    assert [low.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


# --- the loop ------------------------------------------------------------------------------------
def test_renews_at_the_fraction_of_each_certificates_lifetime() -> None:
    clock = FakeClock(horizon=1900)
    ca = FakeCA(clock)
    out = MemoryOutput()
    rot = _rotator(clock, ca, out, check_interval=1000.0)
    _run(rot)
    # 10-minute certificates renewed at 50 %: at 0, 300, 600, ... (never early, never late).
    assert ca.calls == [0, 300, 600, 900, 1200, 1500, 1800]
    assert list(rot.history) == ["initial"] + ["renewal"] * 6


def test_ca_down_keeps_the_certificate_backs_off_capped_and_recovers() -> None:
    clock = FakeClock(horizon=290)
    ca = FakeCA(clock)
    out = MemoryOutput()
    rot = _rotator(clock, ca, out, check_interval=1000.0, backoff_initial=1.0, backoff_max=16.0)
    _run(rot)
    first = dict(out.stored or {})
    clock.horizon = 580
    ca.down = True
    _run(rot)
    # Failures from t=300 on, retried after 1, 2, 4, 8, 16, 16... s, each jittered to its lower half (rand 0).
    gaps = [b - a for a, b in zip(ca.calls[1:], ca.calls[2:], strict=False)]
    assert gaps[:6] == [0.5, 1, 2, 4, 8, 8]
    assert max(gaps) == 8  # capped (16 s, jittered down to half)
    assert out.stored == first  # the old certificate stays
    assert rot.check().ok  # still valid until 600
    assert "renewal failing: UNAVAILABLE" in rot.check().reason
    clock.horizon = 700
    _run(rot)  # past its NotAfter
    assert not rot.check().ok
    assert "expired" in rot.check().reason
    ca.down = False
    clock.horizon = 760
    _run(rot)
    assert out.stored != first
    assert rot.history[-1] == "renewal"
    assert rot.check().ok
    assert rot.last_error is None


def test_root_change_rotates_at_once_even_while_backing_off() -> None:
    clock = FakeClock(horizon=50)
    ca = FakeCA(clock)
    rot = _rotator(clock, ca, MemoryOutput(), check_interval=5.0)
    _run(rot)
    ca.root_change()
    clock.horizon = 60
    _run(rot)
    assert list(rot.history) == ["initial", "root-changed"]
    # Failing (backing off to 60 s), then the root changes: no waiting for the backoff.
    ca.down = True
    clock.horizon = 400
    _run(rot)
    n = len(ca.calls)
    ca.down = False
    ca.root_change()
    clock.horizon = 406
    _run(rot)
    assert len(ca.calls) == n + 1
    assert rot.history[-1] == "root-changed"


def test_deleted_or_tampered_output_is_rewritten_with_a_new_key() -> None:
    clock = FakeClock(horizon=15)
    ca = FakeCA(clock)
    out = MemoryOutput()
    rot = _rotator(clock, ca, out, check_interval=5.0)
    _run(rot)
    keys = [out.stored["key.pem"]] if out.stored else []
    out.stored = None
    clock.horizon = 25
    _run(rot)
    assert out.stored is not None
    keys.append(out.stored["key.pem"])
    out.stored["root-cert.pem"] = b"something else"
    clock.horizon = 35
    _run(rot)
    keys.append(out.stored["key.pem"])
    assert list(rot.history) == ["initial", "deleted", "tampered"]
    assert len(set(keys)) == 3  # a new key for every certificate


def test_a_valid_certificate_in_the_output_is_adopted_not_replaced() -> None:
    clock = FakeClock(horizon=10)
    ca = FakeCA(clock)
    out = MemoryOutput()
    _run(_rotator(clock, ca, out))
    written = dict(out.stored or {})
    again = _rotator(clock, ca, out, check_interval=5.0)
    clock.horizon = 30
    _run(again)
    assert out.stored == written
    assert list(again.history) == []
    assert again.check().ok
    # Something that is not ours (another identity's key) is replaced at once.
    out.stored = {**written, "key.pem": pki.key_pem(pki.new_key())}
    third = _rotator(clock, ca, out)
    clock.horizon = 40
    _run(third)
    assert list(third.history) == ["initial"]


def test_write_failure_is_a_failure_too() -> None:
    clock = FakeClock(horizon=5)
    ca = FakeCA(clock)
    out = MemoryOutput(fail_writes=True)
    rot = _rotator(clock, ca, out, backoff_initial=1.0, backoff_max=4.0)
    _run(rot)
    assert out.stored is None
    assert not rot.check().ok
    assert rot.last_error is not None
    assert rot.last_error.code == "OUTPUT_ERROR"


# --- token claims ----------------------------------------------------------------------------------
def _jwt(claims: str) -> str:
    import base64

    enc = base64.urlsafe_b64encode(claims.encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{enc}.c2ln"


def test_token_identity_from_kubernetes_claims_or_sub() -> None:
    assert token_identity(_jwt('{"kubernetes.io":{"namespace":"a","serviceaccount":{"name":"b"}}}')) == ("a", "b")
    assert token_identity(_jwt('{"sub":"system:serviceaccount:c:d"}')) == ("c", "d")
    for bad in ("not-a-jwt", _jwt("[1]"), _jwt('{"sub":"user"}'), "a.!!.c"):
        with pytest.raises(ValueError, match=r"."):
            token_identity(bad)
