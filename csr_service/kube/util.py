"""Small helpers the controllers share: informers feeding an event loop, API calls in threads,
Kubernetes Events.

The Python ``kubernetes`` client is synchronous: every call runs in a thread
(``asyncio.to_thread``), and informer callbacks, which run on the informer's thread, are handed
to the event loop with ``call_soon_threadsafe`` so controller state is only touched on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from csr_service.kube.informer import Informer

__all__ = ["EventRecorder", "LoopInformer", "Watch", "WatchFactory", "api_status", "is_not_found", "record_event"]

log = logging.getLogger(__name__)


def api_status(exc: BaseException) -> int | None:
    """HTTP status of a ``kubernetes`` ApiException (None for other errors)."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def is_not_found(exc: BaseException) -> bool:
    return api_status(exc) == 404


class LoopInformer:
    """An :class:`Informer` whose events are delivered on an asyncio loop.

    ``on_event(kind, obj)`` runs on the loop that called :meth:`start`.
    """

    def __init__(self, list_fn: Callable[..., Any], on_event: Callable[[str, Any], None], *, name: str, **kw: Any):
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self.informer = Informer(list_fn, self._from_thread, name=name, **kw)

    @property
    def cache(self) -> dict[str, Any]:
        """The informer's cache (read it on the loop: values are replaced, never mutated)."""
        return self.informer.cache

    def _from_thread(self, kind: str, obj: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, kind, obj)

    async def start(self, *, sync_timeout: float | None = None) -> bool:
        """Start watching; wait until the first list is done (or ``sync_timeout``); True if synced."""
        self._loop = asyncio.get_running_loop()
        self.informer.start()
        return await asyncio.to_thread(self.informer.wait_synced, sync_timeout)

    async def stop(self) -> None:
        await asyncio.to_thread(self.informer.stop)


class Watch(Protocol):
    """What a controller uses of a watch: a :class:`LoopInformer`, or a test's in-memory one."""

    @property
    def cache(self) -> Mapping[str, Any]: ...

    async def start(self, *, sync_timeout: float | None = None) -> bool: ...

    async def stop(self) -> None: ...


class WatchFactory(Protocol):
    """How a controller opens its watches (``LoopInformer`` itself by default).

    Controllers take one as ``watch=``: the seam through which tests give them fixed caches
    and send them events, without an apiserver (``tests/support/kube.py``).
    """

    def __call__(
        self,
        list_fn: Callable[..., Any],
        on_event: Callable[[str, Any], None],
        *,
        name: str,
        list_kwargs: dict[str, Any],
    ) -> Watch: ...


def record_event(
    api: Any,
    *,
    kind: str,
    namespace: str,
    name: str,
    uid: str | None,
    reason: str,
    message: str,
    warning: bool = True,
    component: str = "csr-service",
    api_version: str = "v1",
    cluster_scoped: bool = False,
) -> None:
    """Create a core/v1 Event about an object (synchronous: call it in a thread).

    Failures are logged, never raised: an Event is a courtesy to the operator. For a
    ``cluster_scoped`` object the Event is created in ``namespace`` (Kubernetes uses ``default``)
    and refers to the object without a namespace.
    """
    from kubernetes import client

    now = datetime.now(UTC)
    event = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace),
        involved_object=client.V1ObjectReference(
            api_version=api_version, kind=kind, namespace=None if cluster_scoped else namespace, name=name, uid=uid
        ),
        reason=reason,
        message=message[:1024],
        type="Warning" if warning else "Normal",
        source=client.V1EventSource(component=component),
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        reporting_component=component,
    )
    try:
        client.CoreV1Api(api).create_namespaced_event(namespace, event)
    except Exception as exc:  # noqa: BLE001 (no Event is better than a failed controller)
        log.warning("cannot record event %s on %s %s/%s: %s", reason, kind, namespace, name, exc)


class EventRecorder:
    """Records Events in the background: a controller never waits for (or fails on) one."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self._pending: set[asyncio.Future[None]] = set()

    def record(self, **kwargs: Any) -> None:
        """Schedule :func:`record_event` (same keyword arguments, without ``api``) in a thread."""
        task = asyncio.get_running_loop().run_in_executor(None, functools.partial(record_event, self._api, **kwargs))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
