"""The active issuer, chosen at run time by a watched ConfigMap (``--runtime-issuer-configmap``).

Keys of the ConfigMap:

- ``issuer``: the backend (``local``, ``vault``, ...); default: the one given by ``--issuer``;
- any option of that backend without the dashes prefix changed (``local-ca-dir``,
  ``vault-role``, ...), as in the TOML file; options not given keep the command line's values
  when the backend is the command line's, and their defaults otherwise;
- istio-csr's ``issuer-name``, ``issuer-kind``, ``issuer-group``: aliases of the backend's
  ``*-issuer-name/kind/group`` options (the cert-manager backend); without ``issuer`` they
  select the backend that has such options.

On every change, in every worker (each has its own :class:`IssuerSlot`): build the issuer,
start it, have it sign a probe certificate (the serving certificate's names) and check that
the result chains to the trust bundle — so an issuer whose root is not trusted is never
activated — then swap the slot. Requests already running finish on the old issuer (each
reads the slot once); it is closed after ``grace``. The serving certificate is renewed from
the new issuer. A bad configuration changes nothing: a log line in every worker and a
Warning Event on the ConfigMap (from worker 0 only, so there is one per replica). Without
the ConfigMap (absent or deleted), the command line's issuer is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from csr_service.common.errors import ConfigError, CSRServiceError
from csr_service.common.lifecycle import BackgroundTask, Lifecycle
from csr_service.controllers.settings import issuer_values
from csr_service.kube.refs import ObjectRef
from csr_service.kube.util import LoopInformer, record_event
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pipeline.own_cert import issue_own_certificate
from csr_service.pki.chain import ChainError
from csr_service.pki.keys import KeyType
from csr_service.plugins.issuer import Issuer
from csr_service.plugins.registry import ISSUERS, find
from csr_service.trust.bundle import TrustBundle

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = ["RuntimeIssuerController", "issuer_values_from_configmap"]

log = logging.getLogger(__name__)


def issuer_values_from_configmap(
    data: Mapping[str, str], *, default_backend: str, default_values: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(backend, option values) selected by the ConfigMap ``data``; ConfigError if invalid."""
    return issuer_values(data, default_backend=default_backend, default_values=default_values)


def _digest(data: Mapping[str, str] | None) -> str:
    return hashlib.sha256(json.dumps(dict(data or {}), sort_keys=True).encode()).hexdigest()


class RuntimeIssuerController:
    """Component (every worker) that swaps the active issuer as the ConfigMap says.

    :meth:`on_event` (the watch's callback) and :meth:`reconcile` (what the loop runs after
    each event) are public so tests can drive a switch without an apiserver.
    """

    name = "runtime-issuer"
    all_workers = True

    def __init__(
        self,
        runtime: Runtime,
        slot: IssuerSlot,
        trust: TrustBundle,
        *,
        ref: ObjectRef,
        default_backend: str,
        default_values: Mapping[str, Any],
        probe_dns_names: tuple[str, ...],
        grace: timedelta,
        on_change: Any = None,
    ) -> None:
        self._runtime = runtime
        self._slot = slot
        self._trust = trust
        self._ref = ref
        self._default_backend = default_backend
        self._default_values = dict(default_values)
        self._probe_dns = probe_dns_names or ("csr-service.invalid",)
        self._grace = grace.total_seconds()
        self._on_change = on_change
        self._static = slot.current
        self._active_digest = _digest(None)
        #: A rejected configuration is not retried until the ConfigMap changes (no Event storm).
        self._rejected_digest = ""
        self._desired: Any = None  # the ConfigMap (model) or None
        self._informer: LoopInformer | None = None
        # No timer: it runs when the watch reports a change (an event during start() counts).
        self._loop = BackgroundTask("runtime-issuer", self.reconcile, every=math.inf, logger=log)
        self._closing: set[asyncio.Task[None]] = set()
        #: Counts for tests and metrics.
        self.stats = {"switched": 0, "rejected": 0}

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        from kubernetes import client

        self._informer = LoopInformer(
            client.CoreV1Api(self._runtime.kube()).list_namespaced_config_map,
            self.on_event,
            name="runtime-issuer",
            list_kwargs={"namespace": self._ref.namespace, "field_selector": f"metadata.name={self._ref.name}"},
        )
        if await self._informer.start(sync_timeout=30):
            # Apply before the serving certificate is first issued.
            self._desired = self._informer.cache.get(f"{self._ref.namespace}/{self._ref.name}")
            await self.reconcile()
        else:
            log.warning("runtime issuer: %s not readable yet; using --issuer %s", self._ref, self._default_backend)
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._informer is not None:
            await self._informer.stop()
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        current = self._slot.current
        if current is not self._static:
            await _close(current)

    def on_event(self, kind: str, obj: Any) -> None:
        """Note the watched ConfigMap (``DELETED``: gone) and wake the loop to apply it."""
        self._desired = None if kind == "DELETED" else obj
        self._loop.wake()

    # --- switching -------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Apply the ConfigMap last noted by :meth:`on_event`: switch, reject, or nothing if unchanged."""
        cm = self._desired
        data = (cm.data or {}) if cm is not None else None
        digest = _digest(data)
        if digest in (self._active_digest, self._rejected_digest):
            return
        if data is None:
            log.info("runtime issuer: %s absent; back to --issuer %s", self._ref, self._default_backend)
            self._swap(self._static, digest, "the command line's issuer")
            return
        try:
            issuer, backend = await self._build(data)
        except (ConfigError, CSRServiceError) as exc:
            self._reject(cm, digest, exc)
            return
        self._swap(issuer, digest, f"issuer {backend}")
        await self._event(cm, "IssuerChanged", f"csr-service now signs with issuer {backend}", warning=False)

    async def _build(self, data: Mapping[str, str]) -> tuple[Issuer, str]:
        backend, values = issuer_values_from_configmap(
            data, default_backend=self._default_backend, default_values=self._default_values
        )
        plugin = find(ISSUERS, backend)
        plugin.validate(values)
        issuer: Issuer = plugin.create(values, self._runtime)
        try:
            if isinstance(issuer, Lifecycle):
                await issuer.start()
            await self._probe(issuer)
        except BaseException:
            await _close(issuer)
            raise
        return issuer, backend

    async def _probe(self, issuer: Issuer) -> None:
        """Sign a serving-shaped certificate and check that it chains to the trust bundle."""
        try:
            await issue_own_certificate(
                issuer,
                self._trust.current.roots,
                ttl=timedelta(minutes=10),
                key_type=KeyType.EC_P256,
                purpose="serving",
                request_id="runtime-issuer-probe",
                dns_names=self._probe_dns,
            )
        except ChainError as exc:
            raise ConfigError(
                f"its certificates do not chain to the trust bundle ({exc}); add its root to the trust bundle first"
            ) from exc

    def _swap(self, issuer: Issuer, digest: str, what: str) -> None:
        old = self._slot.current
        self._active_digest = digest
        if issuer is old:
            return
        self._slot.current = issuer
        self.stats["switched"] += 1
        log.info("runtime issuer: now signing with %s (from %s)", what, self._ref)
        if self._on_change is not None:
            self._on_change()
        if old is not self._static:
            task = asyncio.create_task(self._close_later(old), name="close-old-issuer")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_later(self, issuer: Issuer) -> None:
        # Requests that read the slot before the swap finish on the old issuer first; on
        # shutdown (cancelled) it is closed at once, the server has drained by then.
        try:
            await asyncio.sleep(self._grace)
        finally:
            await _close(issuer)

    def _reject(self, cm: Any, digest: str, exc: Exception) -> None:
        self.stats["rejected"] += 1
        self._rejected_digest = digest
        public = getattr(exc, "public", "")
        msg = f"{public}: {exc}" if public and public != str(exc) else str(exc)
        log.error(
            "runtime issuer: rejected the configuration in %s, still signing with %s: %s",
            self._ref,
            self._slot.current.name,
            msg,
        )
        task = asyncio.create_task(self._event(cm, "InvalidIssuerConfig", f"rejected, previous issuer kept: {msg}"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _event(self, cm: Any, reason: str, message: str, *, warning: bool = True) -> None:
        if self._runtime.worker_index != 0:
            return  # one Event per replica, not one per worker
        await asyncio.to_thread(
            record_event,
            self._runtime.kube(),
            kind="ConfigMap",
            namespace=self._ref.namespace,
            name=self._ref.name,
            uid=cm.metadata.uid if cm is not None and cm.metadata else None,
            reason=reason,
            message=message,
            warning=warning,
        )


async def _close(issuer: Issuer) -> None:
    if isinstance(issuer, Lifecycle):
        try:
            await issuer.stop()
        except Exception:  # closing must not break switching
            log.exception("runtime issuer: closing %s failed", issuer.name)
