"""Deleting our CertificateRequests that outlived any wait: leftovers of a crash or a lost delete.

Every request we create carries ``app.kubernetes.io/managed-by=csr-service``; a request older
than ``--certmanager-sweep-age`` (at least twice ``--certmanager-timeout``, so never one that
is still being waited for) is deleted, whichever replica or process created it. One pass per
``--certmanager-sweep-interval``, in worker 0 of each replica only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["sweep"]

log = logging.getLogger(__name__)

_PAGE = 500


def _created(obj: Mapping[str, Any]) -> datetime | None:
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return None
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def sweep(
    list_fn: Callable[..., Any],
    delete_fn: Callable[[str], None],
    *,
    label_selector: str,
    max_age: timedelta,
    now: datetime | None = None,
) -> int:
    """One pass (blocking: run it in a thread); returns how many requests were deleted.

    ``list_fn`` is the namespaced list call; pages of 500 keep a big backlog cheap.
    """
    from kubernetes.client.exceptions import ApiException

    cutoff = (now or datetime.now(UTC)) - max_age
    deleted = 0
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"label_selector": label_selector, "limit": _PAGE}
        if token:
            kwargs["_continue"] = token
        page = list_fn(**kwargs)
        for obj in page.get("items") or ():
            created = _created(obj)
            if created is None or created > cutoff:
                continue
            name = str(obj["metadata"]["name"])
            try:
                delete_fn(name)
            except ApiException as exc:
                if exc.status != 404:  # 404: someone else was quicker
                    raise
                continue
            deleted += 1
            log.info("swept leftover CertificateRequest %s (created %s)", name, created.isoformat())
        token = (page.get("metadata") or {}).get("continue") or None
        if not token:
            return deleted
