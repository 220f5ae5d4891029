"""Benchmark: what ``csr-service agent`` costs beside an application, and how many agents one
csr-service replica serves at a 1-minute certificate lifetime.

    python -m bench.agent [--idle 30] [--rotations 10] [--agents 300,1000] [--window 60] [--workers 2]
                          [--client-processes 1] [--skip-agent] [--skip-fleet]

Part 1, one agent process (``csr-service agent`` as a pod runs it, files output, against
``serve --dev``): RSS after start and after the run; CPU while idle (default 1 h certificates,
checks every 10 s); CPU per rotation (1-minute certificates renewed every ~3 s, the idle cost
subtracted), for EC P-256 and RSA 2048 keys.

Part 2, a simulated fleet: N agents split over ``--client-processes`` processes, each the
agent's real rotation loop (``Rotator`` + ``CAClient``: a connection per certificate, its own
token and identity, a new key per certificate) with an in-memory output instead of files,
1-minute certificates renewed at 50 % (jitter 10 %: every ~28.5 s on average), started spread
over one renewal period as a fleet that has been running. Measured over ``--window`` after one
renewal period of warm-up: certificates/s, failures by code, issue latency p50/p99 as the agents
saw it, server CPU (all workers), and the server CPU per certificate above what the server burns
idle (measured for 10 s before). From that, the ceiling: agents one replica serves with its
``--workers`` cores busy = cores / (CPU per certificate) x 28.5 s. It is an extrapolation: one
Python client process saturates at ~100-200 rotations/s (3,000-6,000 agents), and on a small
machine the fleet, the server and other people's jobs share the cores; the figures are what this
machine gave at that moment, not a property of csr-service alone.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, process_tree, rss_mib
from tests.support.dev_server import CSR_SERVICE, free_port, http_get, running_dev_server

RENEW_INTERVAL_S = 0.5 * (1 - 0.1 / 2) * 60  # mean renewal interval of a 1-minute certificate


def _metric(port: int, prefix: str) -> float:
    total = 0.0
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def one_agent(srv: Any, tmp: Path, key_type: str, idle_s: float, rotations: int) -> None:
    token = tmp / f"token-{key_type}"
    token.write_text(srv.token("apps", "bench"))

    def start(extra: list[str], out: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        args = ["agent", "--ca-address", srv.address, "--root-cert", str(srv.root_cert), "--token-file", str(token)]
        args += ["--out-dir", str(tmp / out), "--key-type", key_type, "--http-listen", f"127.0.0.1:{port}", *extra]
        proc = subprocess.Popen([*CSR_SERVICE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http_get(port, "/readyz")[0] == 200:
                    return proc, port
            except OSError:
                pass
            time.sleep(0.2)
        proc.kill()
        raise RuntimeError("agent did not become ready")

    # Idle: a 1-hour certificate (the dev server's maximum), default check interval.
    proc, _ = start([], f"idle-{key_type}")
    time.sleep(2)  # let start-up settle
    rss0 = rss_mib([proc.pid])
    c0 = cpu_seconds([proc.pid])
    time.sleep(idle_s)
    idle_cpu = cpu_seconds([proc.pid]) - c0
    proc.terminate()
    proc.wait()
    # Rotating: 1-minute certificates renewed at 5 % (every ~3 s).
    proc, port = start(["--ttl", "1m", "--renew-at", "0.05", "--renew-jitter", "0"], f"rot-{key_type}")
    n0, c0, t0 = _metric(port, "csr_service_agent_rotations_total"), cpu_seconds([proc.pid]), time.monotonic()
    while _metric(port, "csr_service_agent_rotations_total") < n0 + rotations:
        time.sleep(0.2)
    elapsed, cpu = time.monotonic() - t0, cpu_seconds([proc.pid]) - c0
    n = _metric(port, "csr_service_agent_rotations_total") - n0
    rss1 = rss_mib([proc.pid])
    proc.terminate()
    proc.wait()
    per_rotation = (cpu - idle_cpu / idle_s * elapsed) / n
    print(
        f"  agent {key_type:8s} RSS {rss0:5.1f} MiB idle, {rss1:5.1f} MiB rotating | idle CPU "
        f"{idle_cpu / idle_s * 1000:6.2f} ms/s ({idle_cpu / idle_s * 100:.3f} % of a core) | "
        f"{per_rotation * 1000:6.1f} ms CPU per rotation ({n:.0f} rotations in {elapsed:.0f} s)"
    )


# --- the fleet ------------------------------------------------------------------------------------
class _Null:
    def __init__(self, name: str) -> None:
        self.name = name
        self.stored: dict[str, bytes] | None = None

    def render(self, issued: Any) -> dict[str, bytes]:
        return {"leaf": issued.leaf.serial_number.to_bytes(20, "big")}

    async def read(self) -> dict[str, bytes] | None:
        return self.stored

    async def write(self, issued: Any) -> None:
        self.stored = self.render(issued)


def _fleet(args: tuple[str, str, str, range, float, float]) -> dict[str, Any]:
    address, root, token_dir, agents, warmup, window = args
    import logging

    logging.disable(logging.WARNING)

    from csr_service.agent.ca import CAClient
    from csr_service.agent.rotator import Policy, Rotator
    from csr_service.client import RequestError
    from csr_service.pki.keys import KeyType

    latencies: list[float] = []
    failures: dict[str, int] = {}
    measuring = False

    class TimedCA(CAClient):
        async def issue(self) -> Any:
            t0 = time.perf_counter()
            try:
                return await super().issue()
            except RequestError as exc:
                if measuring:
                    failures[exc.code] = failures.get(exc.code, 0) + 1
                raise
            finally:
                if measuring:
                    latencies.append(time.perf_counter() - t0)

    async def main() -> dict[str, Any]:
        nonlocal measuring
        rotators = []
        for i in agents:
            ca = TimedCA(
                address=address,
                root_file=Path(root),
                token_file=Path(token_dir) / f"sa-{i}",
                identity=f"spiffe://cluster.local/ns/fleet/sa/sa-{i}",
                cluster_id="Kubernetes",
                key_type=KeyType.EC_P256,
                ttl=timedelta(minutes=1),
                tls_server_name=None,
                timeout=30,
            )
            rotators.append(Rotator(_Null(f"agent-{i}"), ca, Policy(renew_at=0.5, jitter=0.1, check_interval=10)))

        async def staggered(r: Rotator) -> None:
            await asyncio.sleep(random.uniform(0, RENEW_INTERVAL_S))
            await r.start()

        starters = [asyncio.create_task(staggered(r)) for r in rotators]
        await asyncio.sleep(warmup)
        done0 = sum(r.rotations for r in rotators)
        cpu0 = time.process_time()
        measuring = True
        t0 = time.monotonic()
        await asyncio.sleep(window)
        measuring = False
        elapsed = time.monotonic() - t0
        done = sum(r.rotations for r in rotators) - done0
        client_cpu = time.process_time() - cpu0
        for s in starters:
            s.cancel()
        await asyncio.gather(*(r.stop() for r in rotators))
        return {"done": done, "elapsed": elapsed, "client_cpu": client_cpu, "lat": latencies, "fail": failures}

    return asyncio.run(main())


def fleet(srv: Any, tmp: Path, agents: int, window: float, workers: int, clients: int) -> None:
    from csr_service.service.dev import mint_dev_token

    token_dir = tmp / f"tokens-{agents}"
    token_dir.mkdir()
    # One dev token minted the normal way; the others are its claims with another service
    # account, signed with the dev key loaded once (loading an RSA key validates it: ~40 ms).
    import jwt

    from csr_service.pki.pem import load_private_key

    template = mint_dev_token(
        str(srv.state_dir), namespace="fleet", service_account="sa-0", audiences=("istio-ca",), ttl=timedelta(hours=2)
    )
    header = jwt.get_unverified_header(template)
    claims = jwt.decode(template, options={"verify_signature": False})
    key = load_private_key((srv.state_dir / "jwt-signing-key.pem").read_bytes())
    for i in range(agents):
        claims["sub"] = f"system:serviceaccount:fleet:sa-{i}"
        claims["kubernetes.io"]["serviceaccount"]["name"] = f"sa-{i}"
        token = jwt.encode(claims, key, algorithm=header["alg"], headers={"kid": header["kid"]})
        (token_dir / f"sa-{i}").write_text(token)
    pids = process_tree(srv.proc.pid)
    # The server's own background work (timers, metrics refresh) with no agent, to subtract.
    i0 = cpu_seconds(pids)
    time.sleep(10)
    idle_rate = (cpu_seconds(pids) - i0) / 10
    ctx = multiprocessing.get_context("spawn")
    shares = [range(c, agents, clients) for c in range(clients)]
    with ctx.Pool(clients) as pool:
        pending = pool.map_async(
            _fleet, [(srv.address, str(srv.root_cert), str(token_dir), r, RENEW_INTERVAL_S + 5, window) for r in shares]
        )
        time.sleep(RENEW_INTERVAL_S + 5)
        s0 = cpu_seconds(pids)
        parts = pending.get()
        server_cpu = cpu_seconds(pids) - s0
    res: dict[str, Any] = {
        "done": sum(p["done"] for p in parts),
        "elapsed": max(p["elapsed"] for p in parts),
        "client_cpu": sum(p["client_cpu"] for p in parts),
        "lat": [x for p in parts for x in p["lat"]],
        "fail": {k: sum(p["fail"].get(k, 0) for p in parts) for p in parts for k in p["fail"]},
    }
    rate = res["done"] / res["elapsed"]
    lat = sorted(res["lat"]) or [0.0]
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    per_cert = max(0.0, server_cpu - idle_rate * res["elapsed"]) / max(1, res["done"])
    ceiling = workers / per_cert * RENEW_INTERVAL_S if per_cert > 0 else float("inf")
    print(
        f"  {agents:6d} agents: {rate:6.1f} certificates/s (expected {agents / RENEW_INTERVAL_S:6.1f}), "
        f"failures {res['fail'] or 0}, issue p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms | server CPU "
        f"{server_cpu / res['elapsed'] * 100:.0f} % of a core (idle {idle_rate * 100:.1f} %), {per_cert * 1000:.2f} ms "
        f"per certificate above idle | client CPU "
        f"{res['client_cpu'] / max(1, res['done']) * 1000:.2f} ms per rotation | ceiling ~{ceiling:,.0f} agents "
        f"per replica ({workers} cores busy)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=30, help="seconds of idle measurement")
    ap.add_argument("--rotations", type=int, default=10, help="rotations measured per key type")
    ap.add_argument("--agents", default="300,1000", help="fleet sizes")
    ap.add_argument("--window", type=float, default=60, help="seconds measured per fleet size")
    ap.add_argument("--workers", type=int, default=2, help="csr-service worker processes")
    ap.add_argument(
        "--client-processes", type=int, default=1, help="processes the simulated fleet is split over (default: 1)"
    )
    ap.add_argument("--skip-fleet", action="store_true")
    ap.add_argument("--skip-agent", action="store_true", help="only the fleet")
    a = ap.parse_args()
    import os

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared with other jobs)")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with running_dev_server(tmp / "state", workers=a.workers) as srv:
            if not a.skip_agent:
                print("one agent process (files output, serve --dev on the same machine):")
                for kt in ("ec-p256", "rsa2048"):
                    one_agent(srv, tmp, kt, a.idle, a.rotations)
            if not a.skip_fleet:
                print(
                    f"simulated fleet at a 1-minute lifetime (renewal every ~{RENEW_INTERVAL_S:.1f} s), "
                    f"csr-service --workers {a.workers}:"
                )
                for n in (int(x) for x in a.agents.split(",")):
                    fleet(srv, tmp, n, a.window, a.workers, a.client_processes)
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
