"""Running CPU-bound crypto without stalling the event loop.

The policy, measured rather than assumed (bench/local_ca.py, profiles in the closing notes):

- Operations of ~0.1 ms (ECDSA P-256/P-384 and RSA-2048 signing, any signature check, JWT
  verification) run inline. Handing each to a thread costs about as much as the operation
  itself (executor hand-off plus the self-pipe wake-up of the loop) and, with the GIL, buys
  no parallelism inside one process.
- Operations of milliseconds (signing with RSA ≥ 3072-bit CA keys: 3–30 ms) go to a small
  thread pool through :func:`run_cpu`, so one slow signature does not hold up every other
  connection on the loop; cryptography releases the GIL while it signs, so these also
  overlap with the loop's own work.

More cores are used by running several worker processes (``--workers``).
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
