"""The trust bundle: the root(s) we publish to workloads and verify every issued chain against.

Several roots may be present at once (old + new during a rotation); the whole bundle is
returned as the last element of every response, which istio-agent takes verbatim as its
root of trust.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from csr_service.common.errors import ConfigError
from csr_service.pki.chain import fingerprint
from csr_service.pki.pem import certs_to_pem, parse_certs

__all__ = ["TrustBundle", "TrustSnapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrustSnapshot:
    """An immutable version of the bundle; requests use one snapshot from start to end."""

    roots: tuple[x509.Certificate, ...]
    pem: str
    version: int
    fingerprints: tuple[str, ...] = field(default=())


class TrustBundle:
    """Holds the current :class:`TrustSnapshot`; replacing it notifies listeners."""

    def __init__(self, roots: Sequence[x509.Certificate] = ()) -> None:
        self._listeners: list[Callable[[TrustSnapshot], None]] = []
        self._snapshot = self._make(roots, 0)

    @staticmethod
    def _make(roots: Sequence[x509.Certificate], version: int) -> TrustSnapshot:
        uniq: dict[str, x509.Certificate] = {}
        for r in roots:
            uniq.setdefault(fingerprint(r), r)
        return TrustSnapshot(
            roots=tuple(uniq.values()),
            pem=certs_to_pem(uniq.values()),
            version=version,
            fingerprints=tuple(uniq),
        )

    @classmethod
    def from_file(cls, path: str) -> TrustBundle:
        try:
            roots = parse_certs(Path(path).read_bytes(), what=path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--root-ca-file: {exc}") from exc
        return cls(roots)

    @property
    def current(self) -> TrustSnapshot:
        return self._snapshot

    def update(self, roots: Sequence[x509.Certificate]) -> bool:
        """Replace the roots; returns True (and notifies) only when they changed."""
        new = self._make(roots, self._snapshot.version + 1)
        if new.fingerprints == self._snapshot.fingerprints:
            return False
        self._snapshot = new
        log.info("trust bundle changed: %d root(s) %s", len(new.roots), ", ".join(f[:16] for f in new.fingerprints))
        for listener in list(self._listeners):
            listener(new)
        return True

    def add_listener(self, listener: Callable[[TrustSnapshot], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[TrustSnapshot], None]) -> None:
        """Stop notifying ``listener`` (a stopped component that may be replaced, e.g. a remote
        cluster's controller); unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)
