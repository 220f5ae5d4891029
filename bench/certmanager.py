"""Benchmark: CreateCertificate through csr-service with the cert-manager issuer (and istio-csr).

    python -m bench.certmanager [--requests 1500] [--concurrency 1,16,64] [--rounds 3] [--workers 1]

Starts the test bed's etcd + kube-apiserver and cert-manager's real controllers (CA Issuer
``istio-system/testbed-ca``, approver on), then drives, with ghz and the same pod-bound
TokenRequest token and CSR:

- **csr-service** ``--issuer cert-manager`` with a least-privilege ServiceAccount kubeconfig
  (certificaterequests create/get/list/watch/delete in istio-system), its default client limit
  (``--kube-qps 200 --kube-burst 400``) and authentication by TokenReview when that
  authenticator is available (else JWT against the apiserver's JWKS; the output says which);
  then once more with client-go's defaults (``--kube-qps 5 --kube-burst 10``, what istio-csr
  runs with), to show what the client limit alone costs;
- **istio-csr v0.17.0**, in the same run against the same apiserver and cert-manager, with its
  defaults (client-go QPS 5 / burst 10) and with ``--disable-kubernetes-client-rate-limiter``,
  when it can be built (``bench/istio_csr_build.py``). The Go module proxy reachable from our
  build machines refuses ``github.com/cert-manager/istio-csr`` (403); the run then says so and
  measures **the model** instead (``bench/istio_csr_model``: istio-csr's per-request API work —
  TokenReview, create, per-request watch, GET, async delete — in Go with client-go and
  cert-manager's clientset), labelled as the model, never as istio-csr.

The unlimited runs are repeated ``--rounds`` times, alternating which goes first, and the median
round (by CSR/s) is printed, then each round's p50 side by side; the QPS-5 runs are slow and
run once with ``--limited-requests``.
Printed per level: CSR/s, p50/p99 (ghz), csr-service's CPU and RSS, and the apiserver calls
per certificate. Everything shares the machine's cores (apiserver, etcd, cert-manager, ghz,
csr-service). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import LoadResult, run_ghz
from bench.istio_csr_build import IstioCsrUnavailable, ensure_istio_csr, ensure_istio_csr_model
from csr_service.pki.certs import build_csr
from csr_service.pki.keys import KeyType, generate_key
from tests.integration.certmanager.support import LEAST_PRIVILEGE_VERBS, grant_requests_role
from tests.support.dev_server import free_port, running_server
from tests.testbed.certmanager import CertManager, start_cert_manager
from tests.testbed.kube import KubeCluster, start_kube, unique_name

NAMESPACE = "bench"
SERVICE_ACCOUNT = "bench"


def _csr(identity: str) -> str:
    from cryptography.hazmat.primitives import serialization

    return build_csr(generate_key(KeyType.EC_P256), uris=(identity,)).public_bytes(serialization.Encoding.PEM).decode()


def _service_account(kube: KubeCluster, namespace: str) -> tuple[str, Path]:
    """A ServiceAccount with the least-privilege Role (+ TokenReview rights); returns (name, kubeconfig)."""
    sa = unique_name("csr-service")
    kube.create_service_account(namespace, sa)
    grant_requests_role(kube, namespace, sa, LEAST_PRIVILEGE_VERBS)
    kube.grant_cluster_role("system:auth-delegator", namespace, sa)  # tokenreviews create
    return sa, kube.kubeconfig_for_service_account(namespace, sa)


def _apiserver_requests(kube: KubeCluster) -> float:
    """Total requests the apiserver has served (its apiserver_request_total counter)."""
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(kube.ca_cert))
    ctx.load_cert_chain(kube.admin_cert, kube.admin_key)
    with urllib.request.urlopen(f"{kube.server}/metrics", context=ctx, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _authn_args(kube: KubeCluster, tmp: Path) -> tuple[list[str], str]:
    del kube, tmp  # the tokenreview authenticator is built in: nothing to prepare
    return ["--authenticator", "tokenreview"], "TokenReview (like istio-csr)"


def _measure(
    label: str,
    kube: KubeCluster,
    *,
    address: str,
    root: Path,
    token: str,
    csr: str,
    pid: int,
    concurrency: int,
    requests: int,
) -> tuple[LoadResult, float]:
    before = _apiserver_requests(kube)
    res = run_ghz(
        label=label,
        address=address,
        root_cert=root,
        token=token,
        csr_pem=csr,
        concurrency=concurrency,
        requests=requests,
        server_pid=pid,
        connections=min(concurrency, 8),
        server_name="csr-service.test",
    )
    calls = (_apiserver_requests(kube) - before) / max(1, res.ok)
    return res, calls


def _timeouts(log: str) -> str:
    """Which step the timed-out requests were stuck in, from csr-service's log."""
    lines = [line for line in log.splitlines() if "timed out after" in line]
    if not lines:
        return ""
    approval = sum("waiting for approval" in line for line in lines)
    return f"  timed out: {approval} waiting for approval, {len(lines) - approval} waiting for the issuer"


def _run_csr_service(
    cm: CertManager,
    tmp: Path,
    args: argparse.Namespace,
    token: str,
    csr: str,
    *,
    label: str,
    qps: int,
    levels: list[tuple[int, int]],
) -> list[tuple[LoadResult, float, str]]:
    """csr-service with ``--kube-qps qps`` (burst twice that) at each (concurrency, requests) level."""
    kube = cm.kube
    _, kubeconfig = _service_account(kube, cm.issuer_namespace)
    root = tmp / "root-cert.pem"
    root.write_text(cm.issuer_ca_pem)
    authn, _ = _authn_args(kube, tmp)
    port = free_port()
    log_path = tmp / f"csr-service-{qps}.log"
    serve = [
        *("--grpc-listen", f"127.0.0.1:{port}", "--workers", str(args.workers), "--log-level", "warning"),
        *("--serving-dns-names", "csr-service.test", "--serving-ip-addresses", "127.0.0.1"),
        *("--issuer", "cert-manager", "--kubeconfig", str(kubeconfig)),
        *("--certmanager-namespace", cm.issuer_namespace, "--certmanager-issuer-name", cm.issuer_name),
        *("--kube-qps", str(qps), "--kube-burst", str(2 * qps)),
        *("--root-ca-file", str(root), *authn),
    ]
    results = []
    with running_server(serve, root_cert=root, state_dir=tmp, log_path=log_path, port=port) as srv:
        # Warm-up: connections, the watch, cert-manager's informers.
        _measure("warm-up", kube, address=srv.address, root=root, token=token, csr=csr, pid=srv.proc.pid,
                 concurrency=8, requests=min(100, 4 * qps))  # fmt: skip
        for conc, count in levels:
            before = len(srv.log())
            res, calls = _measure(
                label,
                kube,
                address=srv.address,
                root=root,
                token=token,
                csr=csr,
                pid=srv.proc.pid,
                concurrency=conc,
                requests=count,
            )
            results.append((res, calls, _timeouts(srv.log()[before:])))
    return results


def _medians(rows: list[tuple[LoadResult, float, str]]) -> list[tuple[LoadResult, float, str]]:
    """Per (label, concurrency), the row with the median CSR/s (first-seen order)."""
    groups: dict[tuple[str, int], list[tuple[LoadResult, float, str]]] = {}
    for row in rows:
        groups.setdefault((row[0].label, row[0].concurrency), []).append(row)
    return [sorted(g, key=lambda r: r[0].rps)[len(g) // 2] for g in groups.values()]


def _per_round(rows: list[tuple[LoadResult, float, str]], other: str) -> None:
    """p50 of each round side by side: a median can hide how often each one was ahead."""
    for conc in sorted({r.concurrency for r, _, _ in rows}):
        ours = [r.p50_ms for r, _, _ in rows if r.label == "csr-service" and r.concurrency == conc]
        theirs = [r.p50_ms for r, _, _ in rows if r.label == other and r.concurrency == conc]
        pairs = list(zip(ours, theirs, strict=False))
        if not pairs:
            continue
        lower = sum(a < b for a, b in pairs)
        shown = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs)
        print(
            f"p50 per round at c={conc} (csr-service/{other}, ms): {shown}; "
            f"csr-service lower in {lower} of {len(pairs)}"
        )


def _ratios(ours: list[tuple[LoadResult, float, str]], others: list[tuple[LoadResult, float, str]]) -> None:
    """The two goals: >= 5x the limited throughput; lower p50 than the unlimited one."""
    for name, limited_label, free_label in (
        ("istio-csr", "istio-csr default", "istio-csr no limit"),
        ("the model", "model qps 5", "model no limit"),
    ):
        limited = [r for r, _, _ in others if r.label == limited_label]
        if limited and limited[0].rps > 0:
            best = max(r.rps for r, _, _ in ours)
            print(f"throughput: csr-service best {best:.1f} CSR/s = {best / limited[0].rps:.1f}x {name} with QPS 5")
        for res, _, _ in ours:
            same = [r for r, _, _ in others if r.label == free_label and r.concurrency == res.concurrency]
            if same:
                print(
                    f"p50 at c={res.concurrency}: csr-service {res.p50_ms:.1f} ms, "
                    f"{name} without limit {same[0].p50_ms:.1f} ms ({same[0].rps:.1f} CSR/s vs {res.rps:.1f})"
                )


def _run_model(
    cm: CertManager,
    tmp: Path,
    binary: Path,
    token: str,
    csr: str,
    *,
    label: str,
    limiter: bool,
    levels: list[tuple[int, int]],
) -> list[tuple[LoadResult, float, str]]:
    """The istio-csr model (bench/istio_csr_model) with or without client-go's QPS 5 / burst 10."""
    from tests.support import pki
    from tests.testbed.process import ManagedProcess

    kube = cm.kube
    _, kubeconfig = _service_account(kube, cm.issuer_namespace)
    serving_ca = pki.make_ca("model-serving-ca")
    (tmp / "model-ca.pem").write_bytes(serving_ca.cert_pem)
    pki.issue(serving_ca, "csr-service.test", dns=["csr-service.test"], server=True).write(
        tmp / "model.crt", tmp / "model.key"
    )
    root = tmp / "root-cert.pem"
    root.write_text(cm.issuer_ca_pem)
    port = free_port()
    argv = [
        binary,
        f"--kubeconfig={kubeconfig}",
        f"--listen=127.0.0.1:{port}",
        f"--tls-cert={tmp / 'model.crt'}",
        f"--tls-key={tmp / 'model.key'}",
        f"--root-ca-file={root}",
        f"--certmanager-namespace={cm.issuer_namespace}",
        f"--issuer-name={cm.issuer_name}",
    ]
    if not limiter:
        argv.append("--disable-kubernetes-client-rate-limiter")
    with ManagedProcess("istio-csr-model", argv, tmp / f"model-{limiter}.log") as proc:
        proc.wait_ready(lambda: "serving on" in proc.tail(5), 30, "serving")
        return _measure_levels(
            kube, f"127.0.0.1:{port}", tmp / "model-ca.pem", token, csr, proc.pid,
            label=label, levels=levels, warm_up=8 if limiter else 100,
        )  # fmt: skip


def _measure_levels(
    kube: KubeCluster,
    address: str,
    root: Path,
    token: str,
    csr: str,
    pid: int,
    *,
    label: str,
    levels: list[tuple[int, int]],
    warm_up: int,
) -> list[tuple[LoadResult, float, str]]:
    """A warm-up of ``warm_up`` calls at c=4, then one measured run per (concurrency, requests)."""
    _measure("warm-up", kube, address=address, root=root, token=token, csr=csr, pid=pid,
             concurrency=4, requests=warm_up)  # fmt: skip
    results = []
    for conc, count in levels:
        res, calls = _measure(
            label, kube, address=address, root=root, token=token, csr=csr, pid=pid,
            concurrency=conc, requests=count,
        )  # fmt: skip
        results.append((res, calls, ""))
    return results


def _run_istio_csr(
    cm: CertManager,
    tmp: Path,
    binary: Path,
    token: str,
    csr: str,
    *,
    label: str,
    limiter: bool,
    levels: list[tuple[int, int]],
) -> list[tuple[LoadResult, float, str]]:
    """The real istio-csr v0.17.0, out of cluster (TESTBED.md), with its defaults or without
    client-go's QPS 5 / burst 10. It asks the same Issuer for its own serving certificate at
    start, so clients trust the Issuer's CA; the admin kubeconfig stands in for its Helm RBAC."""
    import urllib.request

    from tests.testbed.process import ManagedProcess

    kube = cm.kube
    root = tmp / "root-cert.pem"
    root.write_text(cm.issuer_ca_pem)
    port, ready_port, metrics_port = free_port(), free_port(), free_port()
    argv = [
        binary,
        f"--kubeconfig={kube.kubeconfig}",
        f"--serving-address=127.0.0.1:{port}",
        f"--readiness-probe-port={ready_port}",
        f"--metrics-port={metrics_port}",
        "--serving-certificate-dns-names=csr-service.test",
        f"--certificate-namespace={cm.issuer_namespace}",
        f"--issuer-name={cm.issuer_name}",
        "--issuer-kind=Issuer",
        "--issuer-group=cert-manager.io",
        f"--root-ca-file={root}",
        f"--leader-election-namespace={cm.issuer_namespace}",
        "--cluster-id=Kubernetes",
        "--max-client-certificate-duration=1h",
    ]
    if not limiter:
        argv.append("--disable-kubernetes-client-rate-limiter")

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{ready_port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)

    with ManagedProcess("istio-csr", argv, tmp / f"istio-csr-{limiter}.log") as proc:
        proc.wait_ready(ready, 120, "ready")
        return _measure_levels(
            kube, f"127.0.0.1:{port}", root, token, csr, proc.pid, label=label, levels=levels, warm_up=8
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1500, help="requests per load level")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--workers", type=int, default=1, help="csr-service worker processes")
    ap.add_argument("--kube-qps", type=int, default=200, help="csr-service --kube-qps (burst is twice that)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the unlimited runs (median kept)")
    ap.add_argument(
        "--limited-requests", type=int, default=60, help="requests for the runs with QPS 5 / burst 10 (0: skip them)"
    )
    ap.add_argument("--istio-csr-requests", type=int, default=100, help="requests per level for istio-csr")
    ap.add_argument("--model", action="store_true", help="also run bench/istio_csr_model beside istio-csr")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]

    try:
        istio_csr: Path | None = ensure_istio_csr()
        istio_csr_note = str(istio_csr)
    except IstioCsrUnavailable as exc:
        istio_csr, istio_csr_note = None, str(exc)
    model: Path | None = None
    if istio_csr is None or args.model:
        try:
            model = ensure_istio_csr_model()
        except IstioCsrUnavailable as exc:
            istio_csr_note += f"; model: {exc}"

    with tempfile.TemporaryDirectory(prefix="bench-cm-") as tmpdir:
        tmp = Path(tmpdir)
        kube = start_kube(tmp / "kube")
        try:
            cm = start_cert_manager(kube, tmp / "cert-manager")
            try:
                kube.create_namespace(NAMESPACE)
                pod = kube.create_workload(NAMESPACE, SERVICE_ACCOUNT)
                token = kube.token(NAMESPACE, SERVICE_ACCOUNT, pod=pod)
                csr = _csr(f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}")
                print(f"csr-service authenticates callers with {_authn_args(kube, tmp)[1]}")
                started = time.monotonic()
                levels = [(c, args.requests if c > 1 else max(50, args.requests // 6)) for c in args.levels]
                # istio-csr answers in >= 1 s (its root wait): fewer requests, or a level takes minutes.
                icsr_levels = [(c, max(c, min(n, args.istio_csr_requests))) for c, n in levels]
                rounds: list[tuple[LoadResult, float, str]] = []
                for rnd in range(args.rounds):
                    # Alternate who goes first: the shared machine's load drifts during a run.
                    runs = [
                        lambda: _run_csr_service(
                            cm, tmp, args, token, csr, label="csr-service", qps=args.kube_qps, levels=levels
                        )
                    ]
                    if istio_csr is not None:
                        runs.append(
                            lambda: _run_istio_csr(
                                cm,
                                tmp,
                                istio_csr,
                                token,
                                csr,
                                label="istio-csr no limit",
                                limiter=False,
                                levels=icsr_levels,
                            )
                        )
                    if model is not None:
                        runs.append(
                            lambda: _run_model(
                                cm, tmp, model, token, csr, label="model no limit", limiter=False, levels=levels
                            )
                        )
                    for run in runs if rnd % 2 == 0 else reversed(runs):
                        rounds += run()
                elapsed = time.monotonic() - started
                # Same code, with client-go's default limit that istio-csr runs with (QPS 5, burst 10).
                limited = []
                if args.limited_requests > 0:  # 0 skips it (ghz --total 0 would never end)
                    limited = _run_csr_service(
                        cm, tmp, args, token, csr, label="csr-service qps 5", qps=5, levels=[(8, args.limited_requests)]
                    )
                if istio_csr is not None and args.limited_requests > 0:
                    limited += _run_istio_csr(
                        cm, tmp, istio_csr, token, csr, label="istio-csr default", limiter=True,
                        levels=[(8, args.limited_requests)],
                    )  # fmt: skip
                if model is not None and args.limited_requests > 0:
                    limited += _run_model(
                        cm, tmp, model, token, csr, label="model qps 5", limiter=True,
                        levels=[(8, args.limited_requests)],
                    )  # fmt: skip
            finally:
                cm.stop()
        finally:
            kube.stop()

    print(f"\ncert-manager issuer, {args.requests} requests per level (a sixth at c=1), {args.workers} worker(s), "
          f"--kube-qps {args.kube_qps}")  # fmt: skip
    print("apiserver, etcd, cert-manager, ghz and csr-service share this machine; 'apiserver req/CSR' counts")
    print("every client's requests (csr-service's create + delete, cert-manager's status updates and events)")
    print(f"median of {args.rounds} alternating rounds (by CSR/s) per row; limited rows: one round")
    medians = _medians(rounds)
    for res, calls, timeouts in [*medians, *limited]:
        print(f"{res.row()}  apiserver req/CSR {calls:4.1f}{timeouts}")
    ours = [row for row in medians if row[0].label == "csr-service"]
    others = [row for row in [*medians, *limited] if row[0].label.startswith(("model", "istio-csr"))]
    if istio_csr is None:
        print(f"\nistio-csr v0.17.0: NOT MEASURED: {istio_csr_note}")
        if model is not None:
            print("'model' rows: bench/istio_csr_model, istio-csr's per-request API work (TokenReview, create,")
            print("per-request watch, GET, async delete) re-implemented in Go with client-go and cert-manager's")
            print("clientset, with client-go's QPS 5 / burst 10 ('qps 5') or the limiter disabled ('no limit').")
            print("It is a stand-in for istio-csr, not istio-csr.")
        _ratios(ours, others)
        _per_round(rounds, "model no limit")
    else:
        print(f"\n'istio-csr' rows: the real istio-csr v0.17.0 ({istio_csr}), out of cluster, with its")
        print("defaults ('default': client-go QPS 5 / burst 10) or --disable-kubernetes-client-rate-limiter")
        print("('no limit'); it waits 1 s for its roots on every request (pkg/tls/tls.go RootCAs()).")
        if model is not None:
            print("'model' rows: bench/istio_csr_model, its API work in Go without that wait.")
        _ratios(ours, others)
        _per_round(rounds, "istio-csr no limit")
    print(f"(unlimited rounds took {elapsed:.0f}s)")


if __name__ == "__main__":
    main()
