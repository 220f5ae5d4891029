"""Where the trust bundle comes from, and keeping it current without a restart.

Sources, in order of preference (istio-csr's ``rootCAFile`` is the first one):

- a PEM file (``--root-ca-file``): loaded at start, then re-read when it changes (a mounted
  ConfigMap or Secret is updated in place by the kubelet);
- a ConfigMap or Secret key (``--root-ca-configmap`` / ``--root-ca-secret``), watched;
- the issuer's own roots: the local issuer's (they are files the operator gave us), or any
  issuer's with ``--trust-roots-from-issuer`` (trust on first use, logged as a warning).

A source that becomes unreadable, empty or unparsable never empties the bundle: the last good
roots stay and the problem is logged. Every accepted change goes through
:meth:`TrustBundle.update`, whose listeners (serving certificate, root ConfigMaps, istiod
certificate) react. Several roots at once (old + new during a rotation) are normal.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from csr_service.common.errors import ConfigError
from csr_service.common.lifecycle import BackgroundTask
from csr_service.kube.refs import ObjectRef
from csr_service.pki.pem import parse_certs
from csr_service.trust.bundle import TrustBundle

__all__ = ["FileTrustSource", "KubeTrustSource", "parse_roots"]

log = logging.getLogger(__name__)


def parse_roots(data: bytes, what: str) -> list[x509.Certificate]:
    """Parse a PEM bundle of CA certificates; ValueError if empty, unparsable or not CAs."""
    roots = parse_certs(data, what=what)
    if not roots:
        raise ValueError(f"{what}: no certificate found")
    for cert in roots:
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ValueError(f"{what}: {cert.subject.rfc4514_string()!r} is not a CA certificate")
    return roots


class FileTrustSource:
    """Re-reads ``--root-ca-file`` when its content changes (polling; kubelet swaps symlinks)."""

    name = "trust-file"
    all_workers = True

    def __init__(self, path: str, trust: TrustBundle, *, interval: timedelta = timedelta(seconds=10)) -> None:
        self._path = Path(path)
        self._trust = trust
        self._digest = self._read_digest()
        self._poll = BackgroundTask("trust-file", self._check_async, every=interval.total_seconds(), logger=log)
        self._last_error = ""

    def _read_digest(self) -> str:
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return ""

    async def start(self) -> None:
        self._poll.start()

    async def stop(self) -> None:
        await self._poll.stop()

    async def _check_async(self) -> None:
        self.check()

    def check(self) -> bool:
        """Adopt the file's roots if the content changed and parses; True when the bundle changed."""
        try:
            data = self._path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest:
                return False
            roots = parse_roots(data, str(self._path))
        except (OSError, ValueError) as exc:
            if str(exc) != self._last_error:
                log.error("trust bundle file unusable, keeping the current roots: %s", exc)
            self._last_error = str(exc)
            return False
        self._digest, self._last_error = digest, ""
        return self._trust.update(roots)


class KubeTrustSource:
    """The trust bundle from one key of a ConfigMap or Secret, watched.

    Runs in every worker (each has its own :class:`TrustBundle`). ``start`` fails when the
    object or key is missing or bad: a replica without roots could not verify anything.
    """

    all_workers = True

    def __init__(self, runtime: Any, trust: TrustBundle, ref: ObjectRef, *, secret: bool) -> None:
        self.name = f"trust-{'secret' if secret else 'configmap'}"
        self._runtime = runtime
        self._trust = trust
        self._ref = ref
        self._secret = secret
        self._flag = "--root-ca-secret" if secret else "--root-ca-configmap"
        self._informer: Any = None
        self._last_error = ""

    def _extract(self, obj: Any) -> bytes:
        if obj is None:
            raise ValueError(f"{self._ref}: not found")
        data = obj.data or {}
        raw = data.get(self._ref.key)
        if raw is None:
            raise ValueError(f"{self._ref}: key {self._ref.key!r} missing")
        return base64.b64decode(raw) if self._secret else str(raw).encode()

    def _adopt(self, obj: Any) -> None:
        try:
            roots = parse_roots(self._extract(obj), str(self._ref))
        except ValueError as exc:
            if str(exc) != self._last_error:
                log.error("%s unusable, keeping the current roots: %s", self._flag, exc)
            self._last_error = str(exc)
            return
        self._last_error = ""
        self._trust.update(roots)

    def on_event(self, kind: str, obj: Any) -> None:
        """The watch's callback: adopt good roots, keep the last good ones otherwise.

        Public so tests can feed it events without an apiserver.
        """
        if kind == "DELETED":
            log.error("%s %s was deleted; keeping the current roots", self._flag, self._ref)
            return
        self._adopt(obj)

    async def start(self) -> None:
        from kubernetes import client

        from csr_service.kube.util import LoopInformer

        core = client.CoreV1Api(self._runtime.kube())
        list_fn = core.list_namespaced_secret if self._secret else core.list_namespaced_config_map
        self._informer = LoopInformer(
            list_fn,
            self.on_event,
            name=self.name,
            list_kwargs={"namespace": self._ref.namespace, "field_selector": f"metadata.name={self._ref.name}"},
        )
        if not await self._informer.start(sync_timeout=30):
            await self._informer.stop()
            raise ConfigError(f"{self._flag}: cannot read {self._ref} from the apiserver (see the log)")
        obj = self._informer.cache.get(f"{self._ref.namespace}/{self._ref.name}")
        try:
            self._trust.update(parse_roots(self._extract(obj), str(self._ref)))
        except ValueError as exc:
            await self._informer.stop()
            raise ConfigError(f"{self._flag}: {exc}") from exc

    async def stop(self) -> None:
        if self._informer is not None:
            await self._informer.stop()
