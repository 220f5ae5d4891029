"""Open-file limit: every connection is a file descriptor.

A worker holds one descriptor per client connection (``--max-connections`` of them, TLS
handshakes included) plus a few dozen of its own. Containers often start with a soft limit of
1024 and a hard limit far above; like Go's runtime (since 1.19), raise the soft limit to the
hard limit at start, so the connection limit, not EMFILE on accept, is what binds.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["ensure_fd_limit"]

log = logging.getLogger(__name__)

#: Descriptors a worker needs besides client connections (listeners, pipes, files, HTTP side).
RESERVE = 64


def ensure_fd_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn if ``max_connections`` cannot fit.

    Returns the soft limit now in force. Worker processes inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if max_connections and max_connections + RESERVE > soft:
        log.warning(
            "--max-connections %d needs about %d open files per worker but the limit is %d: "
            "connections beyond ~%d will fail to be accepted (raise the container's nofile limit)",
            max_connections,
            max_connections + RESERVE,
            soft,
            max(soft - RESERVE, 0),
        )
    return soft
