"""glibc malloc's per-thread cache, sized for what a worker allocates and frees per call.

Why (measured: docs/operations.md, "Overload", "Measured"). OpenSSL's big-number code, which
every ECDSA signature and check runs, allocates and frees dozens of small blocks of the same
few sizes per operation. glibc keeps 7 freed blocks per size in a thread cache (its default);
the rest go to its "fast bins", which it merges into larger free blocks whenever a block above
~1 KiB is asked for. Under load from many connections, every read and answer asks for such
blocks (the read buffer, OpenSSL's TLS record buffers, request bytes), so the big-number code
keeps finding its sizes gone and takes malloc's slow path. At 5x the capacity over 1,000
connections, malloc and free took 8.7% of the worker's CPU with glibc's default cache, 6.6%
with :data:`TCACHE_COUNT` blocks per size, 5.9% with 2,048 (``perf``; 3.7-4.3% in closed loop
over 32 connections, any size). 512 takes most of that for a fraction of 2,048's memory (the
cache keeps that many freed blocks per size: peak RSS of a worker +46 MiB with 2,048).

How: glibc reads its tunables once, when a process starts, from ``GLIBC_TUNABLES``. So
``csr-service serve`` starts itself again, once, with ``glibc.malloc.tcache_count`` added when
the environment does not set it already; an operator's own value is kept (``=7`` is glibc's
default). Worker processes inherit the environment. Without glibc (musl) nothing changes.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["TCACHE_COUNT", "restart_with_malloc_tuning", "tuned_environment"]

log = logging.getLogger(__name__)

#: Freed blocks glibc keeps per size and thread (its default is 7, its maximum 65535).
TCACHE_COUNT = 512
_TUNABLE = "glibc.malloc.tcache_count"


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with the tcache tunable added, or None when it sets one already."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == _TUNABLE for item in tunables.split(":")):
        return None
    added = f"{_TUNABLE}={TCACHE_COUNT}"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{added}" if tunables else added}


def restart_with_malloc_tuning() -> None:
    """Replace this process by the same command with the tunable set (see the module's doc);
    return only when it is set already, glibc is not the C library, or the restart failed."""
    if platform.libc_ver()[0] != "glibc":
        return
    env = tuned_environment(os.environ)
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, env)  # noqa: S606 (this very command again, no shell)
    except OSError as exc:  # e.g. the interpreter replaced or removed under us: run untuned, and say so
        log.warning("running with glibc's default malloc cache: cannot restart with %s set: %s", _TUNABLE, exc)
