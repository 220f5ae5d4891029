"""The ``istio-ca-root-cert`` ConfigMap in every namespace (leader only).

Every pod with a sidecar mounts this ConfigMap (key ``root-cert.pem``) as its root of trust,
also to verify csr-service's own serving certificate; with ``ENABLE_CA_SERVER=false`` istiod
no longer writes it, so we do. Two informers feed one work queue of namespace names:

- namespaces matching ``--root-configmap-namespace-selector`` (all by default): a new
  namespace is queued;
- ConfigMaps named ``--root-configmap-name`` in all namespaces (a field selector, so only
  those are cached): an edited or deleted one is queued and repaired;
- a trust-bundle change queues every namespace.

Several workers drain the queue (istio-csr uses one, which is slow across thousands of
namespaces). A namespace in the queue is there once, however many events arrive. Writes are
server-side apply with our field manager: one call creates or repairs, only our key and label
are owned, so keys written by others are left alone (istio-csr wipes them); ``force`` takes
our fields back from whoever edited them.

A namespace that stops matching the selector keeps its ConfigMap, untouched from then on
(like istio-csr). Deleting it would make every new pod there fail to start (the
``istio-ca-root-cert`` volume of injected pods is not optional), and a selector edit is easy
to get wrong; the stale ConfigMap is harmless outside the mesh and can be deleted by hand.
Terminating namespaces are skipped (the apiserver refuses writes there).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from csr_service.common.lifecycle import BackgroundTask
from csr_service.kube.util import LoopInformer, Watch, WatchFactory, api_status
from csr_service.trust.bundle import TrustBundle, TrustSnapshot

__all__ = ["ROOT_CERT_KEY", "RootConfigMapController", "desired_configmap", "is_up_to_date"]

log = logging.getLogger(__name__)

ROOT_CERT_KEY = "root-cert.pem"
MESH_LABEL = ("istio.io/config", "true")
FIELD_MANAGER = "csr-service"


def desired_configmap(name: str, namespace: str, pem: str) -> dict[str, Any]:
    """The server-side apply body: only the fields we own."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {MESH_LABEL[0]: MESH_LABEL[1]}},
        "data": {ROOT_CERT_KEY: pem},
    }


def is_up_to_date(cm: Any, pem: str) -> bool:
    """Whether a cached ConfigMap (model object) already carries ``pem`` and our label."""
    if cm is None:
        return False
    labels = (cm.metadata.labels if cm.metadata else None) or {}
    return bool((cm.data or {}).get(ROOT_CERT_KEY) == pem and labels.get(MESH_LABEL[0]) == MESH_LABEL[1])


class _ClusterLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes a remote cluster's lines with its id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[cluster {extra.get('cluster')}] {msg}", kwargs


class RootConfigMapController:
    """Keeps the root ConfigMap current in every matching namespace. A restartable Component.

    Seams for tests (the defaults talk to the apiserver): ``watch`` opens the two watches
    (:class:`~csr_service.kube.util.WatchFactory`, named ``namespaces`` and
    ``root-configmaps``), ``write(namespace, pem)`` writes one ConfigMap (in a thread), and
    ``workers=0`` leaves the queue undrained so :attr:`queued` shows what events queued.
    """

    name = "root-configmaps"
    all_workers = False

    def __init__(
        self,
        api: Any,
        trust: TrustBundle,
        *,
        configmap_name: str = "istio-ca-root-cert",
        namespace_selector: str = "",
        workers: int = 16,
        watch: WatchFactory = LoopInformer,
        write: Callable[[str, str], None] | None = None,
        cluster: str = "",
    ) -> None:
        self._api = api
        self._trust = trust
        self._cm_name = configmap_name
        self._selector = namespace_selector
        self._workers = workers
        self._watch = watch
        self._write = write or self._apply
        self._queue: asyncio.Queue[str] | None = None
        # The names in the queue, in queue order (a dict as an ordered set): each at most once.
        self._queued: dict[str, None] = {}
        self._failures: dict[str, int] = {}
        self._tasks: list[BackgroundTask] = []
        self._ns: Watch | None = None
        self._cms: Watch | None = None
        #: Counts for tests, the benchmark and metrics.
        self.stats = {"applied": 0, "errors": 0, "skipped": 0}
        # A remote cluster's controller says which cluster its lines are about.
        self._log: logging.Logger | logging.LoggerAdapter[logging.Logger] = (
            _ClusterLog(log, {"cluster": cluster}) if cluster else log
        )

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self._api)
        # Listening only while running: a stopped controller (a remote cluster's, replaced when
        # its kubeconfig changes) must not stay reachable from the trust bundle.
        self._trust.add_listener(self._on_trust)
        self._queue = asyncio.Queue()
        self._queued.clear()
        ns_kwargs = {"label_selector": self._selector} if self._selector else {}
        self._ns = self._watch(core.list_namespace, self._on_namespace, name="namespaces", list_kwargs=ns_kwargs)
        self._cms = self._watch(
            core.list_config_map_for_all_namespaces,
            self._on_configmap,
            name="root-configmaps",
            list_kwargs={"field_selector": f"metadata.name={self._cm_name}"},
        )
        self._tasks = [BackgroundTask(f"root-configmaps-{i}", self._worker, logger=log) for i in range(self._workers)]
        # The ConfigMap cache first, so namespaces found up to date need no write at start-up.
        self._tasks.append(BackgroundTask("root-configmaps-informers", self._start_informers, logger=log))
        for task in self._tasks:
            task.start()
        self._log.info(
            "root ConfigMaps: %s in namespaces matching %r, %d workers",
            self._cm_name,
            self._selector or "<all>",
            self._workers,
        )

    async def _start_informers(self) -> None:
        assert self._cms is not None
        assert self._ns is not None
        await self._cms.start()
        await self._ns.start()

    async def stop(self) -> None:
        self._trust.remove_listener(self._on_trust)
        # All at once, as they were started: no worker picks up more work while others stop.
        await asyncio.gather(*(task.stop() for task in self._tasks))
        self._tasks = []
        for inf in (self._ns, self._cms):
            if inf is not None:
                await inf.stop()
        self._ns = self._cms = None
        self._queue = None

    @property
    def queued(self) -> tuple[str, ...]:
        """The namespaces waiting for a worker, oldest first (each at most once)."""
        return tuple(self._queued)

    # --- events (on the loop) ----------------------------------------------------------
    def _enqueue(self, namespace: str) -> None:
        if self._queue is not None and namespace not in self._queued:
            self._queued[namespace] = None
            self._queue.put_nowait(namespace)

    def _on_namespace(self, kind: str, ns: Any) -> None:
        name = ns.metadata.name
        if kind == "DELETED":
            # Deleted, or no longer matching the selector: leave its ConfigMap (module docstring).
            self._log.info(
                "root ConfigMaps: namespace %s deleted or no longer selected; its ConfigMap is left as is", name
            )
            return
        self._enqueue(name)

    def _on_configmap(self, kind: str, cm: Any) -> None:
        ns = cm.metadata.namespace
        selected = self._ns is not None and ns in self._ns.cache
        if selected and (kind == "DELETED" or not is_up_to_date(cm, self._trust.current.pem)):
            self._enqueue(ns)

    def _on_trust(self, snapshot: TrustSnapshot) -> None:
        if self._ns is None:
            return
        self._log.info(
            "root ConfigMaps: trust bundle v%d; updating %d namespaces", snapshot.version, len(self._ns.cache)
        )
        for name in list(self._ns.cache):
            self._enqueue(name)

    # --- work ----------------------------------------------------------------------------
    async def _worker(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            namespace = await queue.get()
            self._queued.pop(namespace, None)
            try:
                await self.reconcile(namespace)
                self._failures.pop(namespace, None)
            except Exception as exc:  # noqa: BLE001 (apiserver trouble: retry this namespace later)
                self._retry_later(namespace, exc)

    def _retry_later(self, namespace: str, exc: Exception) -> None:
        self.stats["errors"] += 1
        n = self._failures[namespace] = self._failures.get(namespace, 0) + 1
        delay = min(60.0, 0.5 * 2 ** min(n, 7)) * (0.5 + random.random() / 2)  # noqa: S311 (jitter)
        self._log.warning(
            "root ConfigMaps: %s/%s not written (HTTP %s, attempt %d), retrying in %.1fs: %s",
            namespace,
            self._cm_name,
            api_status(exc),
            n,
            delay,
            str(exc)[:300],
        )
        asyncio.get_running_loop().call_later(delay, self._enqueue, namespace)

    async def reconcile(self, namespace: str) -> None:
        """Bring one namespace's ConfigMap up to date, as a worker does for a queued name.

        Needs :meth:`start` (it reads the watches' caches); raises what the write raised.
        """
        assert self._ns is not None
        assert self._cms is not None
        ns = self._ns.cache.get(namespace)
        if ns is None or (ns.status is not None and ns.status.phase == "Terminating"):
            self.stats["skipped"] += 1
            return
        snapshot = self._trust.current
        if not snapshot.roots:
            return  # nothing to publish yet; the first bundle queues every namespace
        if is_up_to_date(self._cms.cache.get(f"{namespace}/{self._cm_name}"), snapshot.pem):
            return
        await asyncio.to_thread(self._write, namespace, snapshot.pem)
        self.stats["applied"] += 1
        self._log.debug("root ConfigMaps: %s/%s written (bundle v%d)", namespace, self._cm_name, snapshot.version)

    def _apply(self, namespace: str, pem: str) -> None:
        """The default ``write``: server-side apply of our key and label."""
        from kubernetes import client

        body = desired_configmap(self._cm_name, namespace, pem)
        resp: Any = client.CoreV1Api(self._api).patch_namespaced_config_map(
            self._cm_name,
            namespace,
            body,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
            _preload_content=False,  # the answer is not needed; skip deserialising it
        )
        # Drain before the connection goes back to the pool, or the next request on it
        # reads this body as its status line.
        resp.read()
        resp.release_conn()
