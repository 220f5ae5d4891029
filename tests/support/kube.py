"""In-memory stand-ins for the Kubernetes watches controllers use (no apiserver).

:class:`FakeWatches` is a :class:`~csr_service.kube.util.WatchFactory`: pass it as a
controller's ``watch=`` and it hands out one :class:`FakeWatch` per watch the controller
opens, keyed by the watch's name, with the cache you gave for that name. ``emit`` delivers an
event the way a real watch does (the controller's callback, on the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FakeWatch", "FakeWatches"]


class FakeWatch:
    """A watch whose cache is fixed by the test and whose events the test sends."""

    def __init__(self, cache: Mapping[str, Any], on_event: Callable[[str, Any], None]) -> None:
        self.cache: dict[str, Any] = dict(cache)
        self._on_event = on_event
        self.started = False
        self.stopped = False

    async def start(self, *, sync_timeout: float | None = None) -> bool:
        self.started = True
        return True

    async def stop(self) -> None:
        self.stopped = True

    def emit(self, kind: str, obj: Any) -> None:
        """Deliver one watch event to the controller."""
        self._on_event(kind, obj)


class FakeWatches:
    """Builds :class:`FakeWatch` objects; ``caches[name]`` seeds the watch called ``name``."""

    def __init__(self, caches: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._caches = dict(caches or {})
        self.opened: dict[str, FakeWatch] = {}

    def __call__(
        self,
        list_fn: Callable[..., Any],
        on_event: Callable[[str, Any], None],
        *,
        name: str,
        list_kwargs: dict[str, Any],
    ) -> FakeWatch:
        watch = FakeWatch(self._caches.get(name, {}), on_event)
        self.opened[name] = watch
        return watch

    def __getitem__(self, name: str) -> FakeWatch:
        return self.opened[name]
