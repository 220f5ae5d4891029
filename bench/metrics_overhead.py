"""Benchmark: what the metrics hooks add to one CreateCertificate, in CPU microseconds.

    python -m bench.metrics_overhead [--calls 200000]

Runs the two hooks on the hot path (``observe_rpc`` around the servicer method,
``observe_sign`` around ``issuer.sign``) against no-op callees, next to the same callees
called bare, and prints the difference per call. CPU time (process_time), not wall time, so
other load on the machine disturbs it less than a throughput run. With several workers the
values live in mmap'ed files (prometheus_client's multiprocess mode): ``--multiprocess``
measures that variant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import grpc


class _Context:
    def code(self) -> grpc.StatusCode | None:
        return None


class _Issuer:
    name = "bench"

    async def sign(self, request: Any) -> Any:
        return request


async def _bare(self: Any, request: Any, context: Any) -> Any:
    return request


def _measure(calls: int) -> tuple[float, float, float, float]:
    from csr_service.infra import metrics

    observed = metrics.observe_rpc("bench.Service", "Call")(_bare)
    issuer, ctx = _Issuer(), _Context()

    async def run(fn: Any) -> float:
        t0 = time.process_time()
        for _ in range(calls):
            await fn()
        return (time.process_time() - t0) / calls * 1e6

    async def main() -> tuple[float, float, float, float]:
        rpc_bare = await run(lambda: _bare(None, None, ctx))
        rpc_hook = await run(lambda: observed(None, None, ctx))
        sign_bare = await run(lambda: issuer.sign(None))
        sign_hook = await run(lambda: metrics.observe_sign(issuer, None))  # type: ignore[arg-type]
        return rpc_bare, rpc_hook, sign_bare, sign_hook

    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--multiprocess", action="store_true", help="values in mmap'ed files, as with --workers N")
    args = ap.parse_args()
    if args.multiprocess and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": d}
            cmd = [sys.executable, "-m", "bench.metrics_overhead", "--calls", str(args.calls), "--multiprocess"]
            subprocess.run(cmd, env=env, check=True)
        return
    rpc_bare, rpc_hook, sign_bare, sign_hook = _measure(args.calls)
    mode = "multiprocess (mmap files)" if args.multiprocess else "single process (in memory)"
    print(f"metrics hooks, {mode}, {args.calls} calls each, CPU µs per call")
    print(f"  observe_rpc : {rpc_hook:6.2f} vs bare {rpc_bare:6.2f}  -> +{rpc_hook - rpc_bare:5.2f} µs")
    print(f"  observe_sign: {sign_hook:6.2f} vs bare {sign_bare:6.2f}  -> +{sign_hook - sign_bare:5.2f} µs")
    print(f"  per CreateCertificate: +{rpc_hook - rpc_bare + sign_hook - sign_bare:5.2f} µs")


if __name__ == "__main__":
    main()
