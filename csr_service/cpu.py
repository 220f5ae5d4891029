"""Running CPU-bound crypto without stalling the event loop.

Signing and signature checks take 0.05–5 ms each (RSA-4096 CA keys at the top end). Run
inline, a burst of them would delay every other connection on the loop, including TLS
handshakes and health checks; so they go to a small thread pool. More cores are used by
running several worker processes (``--workers``), not by more threads, because the GIL
serialises Python work anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["run_cpu"]

P = ParamSpec("P")
T = TypeVar("T")

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cpu")
    return _POOL


async def run_cpu(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` in the CPU pool, keeping context variables (request id for logs)."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, fn, *args, **kwargs)
    return await loop.run_in_executor(_pool(), call)
