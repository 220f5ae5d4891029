"""A watched cache of the cluster's pods, for ztunnel impersonation checks (no API call per request).

Only what the check needs is kept: name, namespace, uid, node, service account and phase,
indexed by uid, by namespace/name and by (node, namespace, service account). Only pods in
phase Pending or Running count (a finished pod no longer runs a workload on its node); the
list/watch itself already excludes Succeeded and Failed pods server-side.

Memory: the informer is given the raw JSON dicts (not the client's model objects, which cost
several times more), and each one is cut down in place to the few fields above before it is
stored, so a cluster with tens of thousands of pods costs megabytes, not gigabytes.

RBAC: ``list`` and ``watch`` on ``pods`` cluster-wide. Runs in every worker process
(``all_workers``), because every worker answers requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.kube.informer import Informer

__all__ = ["ACTIVE_PHASES", "PodCache", "PodIndex", "PodInfo"]

log = logging.getLogger(__name__)

ACTIVE_PHASES = frozenset({"Pending", "Running"})
FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """The facts about one pod that impersonation checks use."""

    namespace: str
    name: str
    uid: str
    node: str
    service_account: str
    phase: str

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PodInfo | None:
        """From a pod as raw JSON; None when it lacks what we index on."""
        meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        info = cls(
            namespace=meta.get("namespace") or "",
            name=meta.get("name") or "",
            uid=meta.get("uid") or "",
            node=spec.get("nodeName") or "",
            service_account=spec.get("serviceAccountName") or "default",
            phase=status.get("phase") or "",
        )
        return info if info.namespace and info.name and info.uid else None


def slim(obj: dict[str, Any]) -> None:
    """Cut a raw pod down, in place, to the fields PodInfo and the informer need."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    keep_meta = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta}
    keep_spec = {k: spec[k] for k in ("nodeName", "serviceAccountName") if k in spec}
    obj.clear()
    obj.update(metadata=keep_meta, spec=keep_spec, status={"phase": status.get("phase")})


class PodIndex:
    """Thread-safe indexes over active pods: the informer thread writes, the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, PodInfo] = {}
        self._by_name: dict[tuple[str, str], PodInfo] = {}
        self._by_node_sa: dict[tuple[str, str, str], set[str]] = {}

    def __len__(self) -> int:
        return len(self._by_uid)

    def apply(self, kind: str, info: PodInfo) -> None:
        """Apply an informer event (ADDED, MODIFIED, DELETED) about ``info``."""
        with self._lock:
            self._remove(info.uid)
            if kind != "DELETED" and info.phase in ACTIVE_PHASES:
                self._by_uid[info.uid] = info
                self._by_name[(info.namespace, info.name)] = info
                if info.node:
                    self._by_node_sa.setdefault((info.node, info.namespace, info.service_account), set()).add(info.uid)

    def _remove(self, uid: str) -> None:
        old = self._by_uid.pop(uid, None)
        if old is None:
            return
        if self._by_name.get((old.namespace, old.name)) is old:
            del self._by_name[(old.namespace, old.name)]
        key = (old.node, old.namespace, old.service_account)
        uids = self._by_node_sa.get(key)
        if uids is not None:
            uids.discard(uid)
            if not uids:
                del self._by_node_sa[key]

    def pod_by_uid(self, uid: str) -> PodInfo | None:
        with self._lock:
            return self._by_uid.get(uid)

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        with self._lock:
            return self._by_name.get((namespace, name))

    def has_pod_on_node(self, node: str, namespace: str, service_account: str) -> bool:
        """Whether an active pod running as ``namespace/service_account`` is on ``node``."""
        with self._lock:
            return bool(self._by_node_sa.get((node, namespace, service_account)))


class PodCache(PodIndex):
    """A :class:`PodIndex` kept current by an :class:`~csr_service.kube.informer.Informer`.

    ``start`` waits up to ``sync_timeout`` for the first list, then lets the service start
    anyway (requests needing the cache get UNAVAILABLE until it is synced): an apiserver blip
    at start-up must not stop the CA from signing ordinary requests.
    """

    name = "pod-cache"
    all_workers = True

    def __init__(self, api_client: Any, *, sync_timeout: timedelta = timedelta(seconds=30)) -> None:
        super().__init__()
        self._api_client = api_client
        self._sync_timeout = sync_timeout.total_seconds()
        self._informer: Informer | None = None

    def is_synced(self) -> bool:
        return self._informer is not None and self._informer.synced.is_set()

    def stored_objects(self) -> dict[str, Any]:
        """A shallow copy of what the watch keeps, by namespace/name: the slimmed raw pods.

        For checking the memory claim in the module docstring; empty before :meth:`start`.
        """
        return dict(self._informer.cache) if self._informer is not None else {}

    async def start(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self._api_client)

        def list_pods(**kwargs: Any) -> Any:
            # Raw JSON instead of V1Pod models (see the module docstring). The Watch streams
            # the raw response it asked for (watch=True, _preload_content=False); without a
            # ":rtype:" here it hands us the event objects as dicts too.
            if kwargs.get("watch"):
                return core.list_pod_for_all_namespaces(**kwargs)
            response: Any = core.list_pod_for_all_namespaces(_preload_content=False, **kwargs)
            result = json.loads(response.data)
            # Slim here too: after a re-list the informer stores unchanged pods without an event.
            for item in result.get("items") or ():
                slim(item)
            return result

        self._informer = Informer(
            list_pods, self._on_event, name="pods", list_kwargs={"field_selector": FIELD_SELECTOR}
        )
        self._informer.start()
        if not await asyncio.to_thread(self._informer.wait_synced, self._sync_timeout):
            log.warning("pod cache: not synced after %.0fs; impersonation requests will be retried", self._sync_timeout)
        else:
            log.info("pod cache: synced, %d active pods", len(self))

    async def stop(self) -> None:
        if self._informer is not None:
            await asyncio.to_thread(self._informer.stop)

    def _on_event(self, kind: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        # In place: the informer keeps this same dict in its cache (see the module docstring).
        slim(obj)
        info = PodInfo.from_object(obj)
        if info is not None:
            self.apply(kind, info)
