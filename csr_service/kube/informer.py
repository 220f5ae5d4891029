"""A minimal informer: list, then watch from that resourceVersion, forever, in a thread.

What client-go's reflector does, for the Python client: keep a local cache of the objects
matching a list call, and call back on every change. Handles what kills naive watches:

- ``410 Gone`` (the resourceVersion is too old): re-list, diff against the cache, continue;
- dropped connections, apiserver restarts, timeouts: reconnect with capped backoff; a
  server-side ``timeout_seconds`` makes every watch end regularly, so a silently dead TCP
  connection cannot stall us for long;
- a re-list after a gap synthesises the ADDED/MODIFIED/DELETED events that were missed.

Callbacks run on the informer thread; hand work to an event loop with
``loop.call_soon_threadsafe`` if needed. Objects are the client's dicts when ``list_fn`` is a
CustomObjectsApi method, or model objects otherwise (``_preload_content`` is left alone);
``key_fn`` names them (default ``namespace/name``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Event", "Informer"]

log = logging.getLogger(__name__)

#: (type, object): type is ADDED, MODIFIED or DELETED.
Event = tuple[str, Any]


def _meta(obj: Any) -> Any:
    return obj["metadata"] if isinstance(obj, dict) else obj.metadata


def _field(meta: Any, name: str) -> Any:
    if isinstance(meta, dict):
        return meta.get({"resource_version": "resourceVersion"}.get(name, name))
    return getattr(meta, name, None)


def default_key(obj: Any) -> str:
    meta = _meta(obj)
    ns = _field(meta, "namespace")
    return f"{ns}/{_field(meta, 'name')}" if ns else str(_field(meta, "name"))


class Informer:
    """Keeps ``cache`` in sync with the apiserver and calls ``on_event`` for each change.

    Args:
        list_fn: a list call, e.g. ``CoreV1Api(api).list_namespace`` or a bound
            ``functools.partial`` of ``list_namespaced_custom_object(...)``.
        on_event: called as ``on_event(type, obj)`` on the informer thread.
        name: for logs and the thread name.
        list_kwargs: extra arguments for every list/watch call (label_selector, ...).
        watch_timeout: server-side timeout of each watch request, in seconds.
    """

    def __init__(
        self,
        list_fn: Callable[..., Any],
        on_event: Callable[[str, Any], None],
        *,
        name: str,
        list_kwargs: dict[str, Any] | None = None,
        key_fn: Callable[[Any], str] = default_key,
        watch_timeout: int = 240,
    ) -> None:
        self._list_fn = list_fn
        self._on_event = on_event
        self.name = name
        self._kwargs = dict(list_kwargs or {})
        self._key = key_fn
        self._watch_timeout = watch_timeout
        self.cache: dict[str, Any] = {}
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        #: Counts, for tests and metrics: lists done, watches (re)started, 410s seen.
        self.stats = {"lists": 0, "watches": 0, "gone": 0, "errors": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
            # Watch.stop() only takes effect at the next event; shutting the socket down
            # unblocks the read now, so a controller that loses its lease stops promptly.
            resp = getattr(watch, "_resp", None)
            shutdown = getattr(resp, "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):
                    shutdown()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self.synced.wait(timeout)

    # --- internals ---------------------------------------------------------------------
    def _emit(self, kind: str, obj: Any) -> None:
        try:
            self._on_event(kind, obj)
        except Exception:  # a broken handler must not kill the informer
            log.exception("informer %s: event handler failed", self.name)

    def _relist(self) -> str:
        result = self._list_fn(**self._kwargs)
        self.stats["lists"] += 1
        items = result["items"] if isinstance(result, dict) else result.items
        rv = _field(result["metadata"] if isinstance(result, dict) else result.metadata, "resource_version")
        fresh = {self._key(o): o for o in items}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._emit("DELETED", old)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                self._emit("ADDED", obj)
            elif _field(_meta(old), "resource_version") != _field(_meta(obj), "resource_version"):
                self._emit("MODIFIED", obj)
        self.synced.set()
        return str(rv)

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        failures = 0
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                self.stats["watches"] += 1
                for ev in self._watch.stream(
                    self._list_fn,
                    resource_version=rv,
                    timeout_seconds=self._watch_timeout,
                    allow_watch_bookmarks=True,
                    # The server ends each watch after timeout_seconds; a read blocking much
                    # longer means a half-open connection (peer gone without FIN/RST).
                    _request_timeout=self._watch_timeout + 30,
                    **self._kwargs,
                ):
                    if self._stop.is_set():
                        break
                    kind, obj = ev["type"], ev["object"]
                    if kind == "ERROR":
                        code = obj.get("code") if isinstance(obj, dict) else getattr(obj, "code", None)
                        if code == 410:
                            raise ApiException(status=410, reason="Gone")
                        raise RuntimeError(f"watch error event: {obj}")
                    new_rv = _field(_meta(obj), "resource_version")
                    if kind == "BOOKMARK":
                        rv = str(new_rv)
                        continue
                    key = self._key(obj)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    rv = str(new_rv)
                    self._emit(kind, obj)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    self.stats["gone"] += 1
                    log.info("informer %s: resourceVersion expired (410 Gone); re-listing", self.name)
                    rv = None
                    continue
                failures += 1
                self.stats["errors"] += 1
                log.warning("informer %s: API error %s %s; retrying", self.name, exc.status, exc.reason)
                if exc.status in (401, 403):
                    rv = None
            except Exception as exc:  # noqa: BLE001 (connection reset, apiserver restart, timeouts)
                if self._stop.is_set():
                    break  # our own stop() shut the connection down
                failures += 1
                self.stats["errors"] += 1
                log.warning("informer %s: watch failed (%s: %s); reconnecting", self.name, type(exc).__name__, exc)
            finally:
                self._watch = None
            if failures:
                # Capped exponential backoff with jitter, but react quickly to a single blip.
                delay = min(30.0, 0.2 * 2 ** min(failures, 8)) * (0.5 + random.random() / 2)  # noqa: S311
                self._stop.wait(delay)
