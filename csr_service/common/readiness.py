"""What readiness is made of: named checks with reasons, and the source the HTTP side asks.

Vocabulary shared by the worker's health evaluation (:mod:`csr_service.service.health`) and
the HTTP endpoint that shows it (:mod:`csr_service.transport.http`), so neither imports the
other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Check", "ReadinessReport", "ReadinessSource"]


@dataclass(frozen=True, slots=True)
class Check:
    """One readiness condition and why it holds or not (shown in the ``/readyz`` body)."""

    name: str
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    """All checks of one worker (or of the whole replica); ready when every check is ok."""

    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        """Kubernetes' ``/readyz?verbose`` style: one ``[+]``/``[-]`` line per check."""
        lines = [f"[{'+' if c.ok else '-'}]{c.name} {'ok' if c.ok else 'failed'}: {c.reason}" for c in self.checks]
        lines.append("readyz check passed" if self.ready else "readyz check failed")
        return "\n".join(lines) + "\n"


class ReadinessSource(Protocol):
    """What the HTTP side asks; must return at once."""

    def report(self) -> ReadinessReport: ...
