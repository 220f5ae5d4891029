"""One shared watch over the CertificateRequests this process created, dispatching by name.

istio-csr opens a watch per request (plus a GET); that is two extra API calls and one open
stream per CSR in flight. Here one :class:`~csr_service.kube.informer.Informer` per process
watches the requests carrying this process's instance label, and hands each event to the
request waiting for that name. What makes that safe:

- a request registers under its name right after ``create`` returns; whatever the informer
  already holds for that name is offered at once, so an event that arrived first is not lost;
- every time the watch (re)starts (reconnect, apiserver restart, 410 re-list) the waiting
  requests are re-read with a GET, in case their terminal update fell into the gap;
- events are applied in resourceVersion order per request, so a late GET cannot move a
  request back to an earlier phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from csr_service.common.errors import CSRServiceError
from csr_service.kube.informer import Informer
from issuers.certmanager.status import RequestState, classify, deleted_state

__all__ = ["RequestWatch", "Waiter"]

log = logging.getLogger(__name__)


def _newer(candidate: str, current: str) -> bool:
    """Whether resourceVersion ``candidate`` is not older than ``current``.

    resourceVersions are opaque strings; etcd-backed ones are integers, which we compare when we
    can. If we cannot tell, the candidate wins (events come in order anyway).
    """
    if not current or not candidate:
        return True
    try:
        return int(candidate) >= int(current)
    except ValueError:
        return True


class Waiter:
    """One request's latest state, and a future (on the waiting request's loop) for the outcome.

    Events are classified on the thread that receives them (the informer's, a re-GET's);
    only the outcome crosses to the event loop. A request sees four or five events
    (created, approved, issued, deleted ...) and needs one of them: waking the loop for each
    cost a self-pipe write and a loop turn per event, on a machine where every syscall counts.
    """

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        #: The latest state seen, for the timeout message ("waiting for approval" ...).
        self.state: RequestState | None = None
        self.done: asyncio.Future[RequestState] = loop.create_future()
        self._lock = threading.Lock()  # state updates come from the loop and from threads
        self._final = False

    def _apply(self, obj: Mapping[str, Any] | None) -> RequestState | CSRServiceError | None:
        """Take ``obj`` (``None``: deleted) into account; returns the outcome when it is final."""
        try:
            state = deleted_state() if obj is None else classify(obj)
        except CSRServiceError as exc:  # unreadable status.certificate
            with self._lock:
                if self._final:
                    return None
                self._final = True
                return exc
        with self._lock:
            if self._final:
                return None
            # Events come in order, but a re-GET may answer with an older version.
            if (
                obj is not None
                and self.state is not None
                and not _newer(state.resource_version, self.state.resource_version)
            ):
                return None
            self.state = state
            if not state.phase.terminal:
                return None
            self._final = True
            return state

    def _deliver(self, outcome: RequestState | CSRServiceError) -> None:
        if self.done.done():
            return
        if isinstance(outcome, CSRServiceError):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)

    def offer(self, obj: Mapping[str, Any] | None) -> None:
        """Apply an object (``None``: deleted), on the waiter's loop."""
        outcome = self._apply(obj)
        if outcome is not None:
            self._deliver(outcome)

    def offer_threadsafe(self, obj: Mapping[str, Any] | None) -> None:
        """:meth:`offer` from another thread (the informer's, a GET's)."""
        outcome = self._apply(obj)
        if outcome is not None:
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver, outcome)


class RequestWatch:
    """The informer plus the table of waiting requests, keyed by name.

    Args:
        list_fn: ``list_namespaced_custom_object`` bound to group/version/namespace/plural.
        get_fn: ``get_namespaced_custom_object`` bound likewise, taking the name.
        label_selector: selects exactly this process's requests.
        executor: where the re-GETs after a watch restart run.
    """

    def __init__(
        self,
        list_fn: Callable[..., Any],
        get_fn: Callable[[str], Any],
        *,
        label_selector: str,
        executor: Executor,
        name: str = "certificaterequests",
        watch_timeout: int = 60,
    ) -> None:
        self._list_fn = list_fn
        self._get_fn = get_fn
        self._executor = executor
        self._waiters: dict[str, Waiter] = {}
        self._lock = threading.Lock()
        self.watch_starts = 0
        self.informer = Informer(
            self._list,
            self._on_event,
            name=name,
            list_kwargs={"label_selector": label_selector},
            key_fn=lambda obj: str(obj["metadata"]["name"]),
            watch_timeout=watch_timeout,
        )

    # --- informer callbacks (informer thread) ------------------------------------------
    def _list(self, **kwargs: Any) -> object:
        """The list/watch call; notices when a watch stream has been opened."""
        result = self._list_fn(**kwargs)
        if kwargs.get("watch"):
            # The call returns once the apiserver accepted the watch: from here on nothing is
            # missed, so re-read whatever changed while no watch was open.
            self.watch_starts += 1
            if self.watch_starts > 1:
                self._reread_waiting()
        return result

    def _on_event(self, kind: str, obj: Any) -> None:
        name = str(obj["metadata"]["name"])
        with self._lock:
            waiter = self._waiters.get(name)
        if waiter is not None:
            waiter.offer_threadsafe(None if kind == "DELETED" else obj)

    def _reread_waiting(self) -> None:
        with self._lock:
            waiting = list(self._waiters.values())
        if waiting:
            log.info("CertificateRequest watch restarted: re-reading %d waiting request(s)", len(waiting))
        for waiter in waiting:
            self._executor.submit(self._reread, waiter)

    def _reread(self, waiter: Waiter) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self._get_fn(waiter.name)
        except ApiException as exc:
            if exc.status == 404:
                waiter.offer_threadsafe(None)
                return
            log.warning("re-reading CertificateRequest %s failed: %s %s", waiter.name, exc.status, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 (connection errors: the next watch start retries)
            log.warning("re-reading CertificateRequest %s failed: %s", waiter.name, exc)
            return
        waiter.offer_threadsafe(obj)

    # --- request side (event loop) -----------------------------------------------------
    def register(self, name: str, created: Mapping[str, Any]) -> Waiter:
        """Start waiting for ``name``; ``created`` is what ``create`` returned."""
        waiter = Waiter(name, asyncio.get_running_loop())
        with self._lock:
            self._waiters[name] = waiter
        waiter.offer(created)
        # The informer may have seen updates before we registered: its cache has the latest.
        cached = self.informer.cache.get(name)
        if cached is not None:
            waiter.offer(cached)
        return waiter

    def unregister(self, name: str) -> None:
        """Stop dispatching events for ``name``."""
        with self._lock:
            self._waiters.pop(name, None)

    @property
    def waiting(self) -> int:
        """How many requests are waiting (for metrics and tests)."""
        with self._lock:
            return len(self._waiters)

    def start(self) -> None:
        """Start the informer thread."""
        self.informer.start()

    def stop(self) -> None:
        """Stop the informer thread (blocks up to a few seconds: call it from a thread)."""
        self.informer.stop()
