"""Two replicas with ``--leader-election`` and ``--root-configmaps``; the leader is killed with
SIGKILL (no lease release, no goodbye) while agents ask both replicas for certificates.

The other replica never stops signing; it takes the Lease over once the dead leader's record has
gone unrenewed for the lease duration; and the leader-only work (the root ConfigMap in every
selected namespace) goes on there: a namespace created after the kill gets its ConfigMap and a
tampered one is repaired. Calls to the dead replica fail with UNAVAILABLE only (a Service would
send those agents to the survivor).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from csr_service.pki.pem import parse_certs
from tests.integration.chaos.conftest import metric_total, scrape
from tests.integration.kube_controllers.conftest import (
    ROOT_CONFIGMAP_RULES,
    csr_service,
    lease_rules,
    make_ca,
    new_identity,
    write_bundle,
)
from tests.support.dev_server import free_port
from tests.support.mesh import BackgroundLoad, make_workloads
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube

LEASE = "csr-service"
LEASE_SECONDS = 6
CM = "istio-ca-root-cert"
AGENTS = 6


def _leader_args(ca_dir: Path, bundle: Path, lease_ns: str, identity: str, selector: dict[str, str]) -> list[str]:
    """A replica with the local CA, leader election and root ConfigMaps (the leader-only work)."""
    return [
        *("--issuer", "local", "--local-ca-dir", str(ca_dir), "--root-ca-file", str(bundle)),
        *("--leader-election", "--leader-election-namespace", lease_ns, "--leader-election-identity", identity),
        *("--leader-election-retry-period", "1s", "--log-level", "info"),
        *("--root-configmaps", "--root-configmap-namespace-selector"),
        ",".join(f"{k}={v}" for k, v in selector.items()),
    ]


def _agent_accounts(kube: KubeCluster) -> list[tuple[str, str, str]]:
    """(namespace, service account, token) of AGENTS workloads."""
    ns = kube.create_namespace()
    accounts = []
    for i in range(AGENTS):
        kube.create_service_account(ns, f"sa-{i}")
        accounts.append((ns, f"sa-{i}", kube.token(ns, f"sa-{i}")))
    return accounts


@pytest.mark.timeout(300)
def test_killed_leader_hands_over_and_signing_never_stops(kube: KubeCluster, jwks_file: Path, tmp_path: Path) -> None:
    lease_ns = kube.create_namespace()
    ca = make_ca(tmp_path / "ca")
    bundle = write_bundle(tmp_path / "bundle.pem", ca)
    pem = bundle.read_text()
    selector = {"csr-chaos": unique_name("mesh")}
    identities = {}
    for name in ("a", "b"):
        ident = new_identity(kube, tmp_path, name=f"csr-service-{name}")
        ident.grant(lease_rules(LEASE), lease_ns)
        ident.grant(ROOT_CONFIGMAP_RULES)
        identities[name] = ident

    def args(identity: str) -> list[str]:
        return [
            *_leader_args(ca.directory, bundle, lease_ns, identity, selector),
            *("--leader-election-lease-duration", f"{LEASE_SECONDS}s", "--leader-election-renew-deadline", "4s"),
        ]

    accounts = _agent_accounts(kube)
    first_ns = kube.create_namespace(labels=selector)

    with csr_service(kube, identities["a"], jwks_file, bundle, args("a"), tmp_path=tmp_path, name="a") as srv_a:
        wait_for(lambda: kube.lease_holder(lease_ns, LEASE) == "a", what="a leads")
        wait_for(lambda: kube.root_configmap_pem(first_ns) == pem, what="the leader writes the root ConfigMap")
        with (
            csr_service(kube, identities["b"], jwks_file, bundle, args("b"), tmp_path=tmp_path, name="b") as srv_b,
            BackgroundLoad(make_workloads(accounts), srv_a.address, bundle.read_bytes()) as load_a,
            BackgroundLoad(make_workloads(accounts), srv_b.address, bundle.read_bytes(), seed=1) as load_b,
        ):
            load_a.wait_until_each_certified(since=0)
            load_b.wait_until_each_certified(since=0)
            assert kube.lease_holder(lease_ns, LEASE) == "a"

            os.kill(srv_a.proc.pid, signal.SIGKILL)  # the whole replica: --workers 1 serves in-process
            killed_at = load_b.now()
            # b takes over once a's record has gone unrenewed for the lease duration (b's clock).
            wait_for(lambda: kube.lease_holder(lease_ns, LEASE) == "b", timeout=LEASE_SECONDS + 20, what="b takes over")
            # Leader-only work goes on, on b: a new namespace, and repairs.
            later_ns = kube.create_namespace(labels=selector)
            wait_for(
                lambda: kube.root_configmap_pem(later_ns) == pem,
                what="the new leader writes new namespaces' ConfigMaps",
            )
            kube.core.patch_namespaced_config_map(CM, first_ns, {"data": {"root-cert.pem": "tampered"}})
            wait_for(lambda: kube.root_configmap_pem(first_ns) == pem, what="the new leader repairs ConfigMaps")
            load_b.wait_until_each_certified(since=load_b.now())
            assert "became leader" in srv_b.log()

    assert load_a.report is not None
    assert load_b.report is not None
    # Signing on b never stopped, not even for a call, while a died and b took over.
    assert [a for a in load_b.report.attempts if not a.ok] == []
    assert any(a.ok and a.started > killed_at for a in load_b.report.attempts)
    # The dead replica's callers got UNAVAILABLE only, and certificates until it died.
    assert {a.code for a in load_a.report.attempts if not a.ok} <= {"UNAVAILABLE"}
    roots = parse_certs(bundle.read_bytes())
    assert load_b.report.problems(roots) == []
    assert [o for o in load_a.report.outcomes if o.chain is not None and o.problems(roots)] == []


@pytest.mark.timeout(300)
def test_killed_leading_worker_is_replaced_and_leads_again(kube: KubeCluster, jwks_file: Path, tmp_path: Path) -> None:
    """``kill -9`` of worker 0 (the one that runs the elector and the controllers) of a
    two-worker replica: the supervisor replaces it, the replacement (same identity) holds the
    Lease again without waiting for it to expire, its controllers work, and worker 1 signs on."""
    lease_ns = kube.create_namespace()
    ca = make_ca(tmp_path / "ca")
    bundle = write_bundle(tmp_path / "bundle.pem", ca)
    pem = bundle.read_text()
    selector = {"csr-chaos": unique_name("mesh")}
    ident = new_identity(kube, tmp_path, name="csr-service-w")
    ident.grant(lease_rules(LEASE), lease_ns)
    ident.grant(ROOT_CONFIGMAP_RULES)
    http = free_port()
    args = [
        *_leader_args(ca.directory, bundle, lease_ns, "w", selector),
        *("--leader-election-lease-duration", "60s", "--leader-election-renew-deadline", "40s"),
        *("--http-listen", f"127.0.0.1:{http}"),
    ]
    accounts = _agent_accounts(kube)
    first_ns = kube.create_namespace(labels=selector)

    with csr_service(kube, ident, jwks_file, bundle, args, tmp_path=tmp_path, name="w", workers=2) as srv:
        wait_for(lambda: kube.lease_holder(lease_ns, LEASE) == "w", what="the replica leads")
        wait_for(lambda: kube.root_configmap_pem(first_ns) == pem, what="root ConfigMap written")
        wait_for(lambda: metric_total(scrape(http), "csr_service_leader") == 1, what="leader gauge")
        with BackgroundLoad(make_workloads(accounts), srv.address, bundle.read_bytes(), pause=0.05) as load:
            load.wait_until_each_certified(since=0)
            workers = _children(srv.proc.pid)
            assert len(workers) == 2
            os.kill(min(workers), signal.SIGKILL)  # worker 0: the supervisor starts them in order
            killed_at = load.now()
            wait_for(lambda: "worker 0 died" in srv.log(), what="the supervisor saw worker 0 die")
            wait_for(lambda: len(_children(srv.proc.pid) - workers) == 1, what="a replacement worker")
            # The replacement leads at once: the Lease names this replica, which it is.
            wait_for(lambda: srv.log().count("became leader") == 2, timeout=20, what="the new worker 0 leads")
            later_ns = kube.create_namespace(labels=selector)
            wait_for(lambda: kube.root_configmap_pem(later_ns) == pem, what="ConfigMaps written by the new worker 0")
            kube.core.patch_namespaced_config_map(CM, first_ns, {"data": {"root-cert.pem": "tampered"}})
            wait_for(lambda: kube.root_configmap_pem(first_ns) == pem, what="ConfigMaps repaired by the new worker 0")
            load.wait_until_each_certified(since=load.now())
        assert kube.lease_holder(lease_ns, LEASE) == "w"
        wait_for(lambda: metric_total(scrape(http), "csr_service_leader") == 1, what="leader gauge after the restart")
        assert metric_total(scrape(http), "csr_service_worker_restarts_total") == 1

    assert load.report is not None
    failed = [a for a in load.report.attempts if not a.ok]
    assert {a.code for a in failed} <= {"UNAVAILABLE"}, failed
    assert all(a.started <= killed_at + 2.0 for a in failed), (killed_at, failed)
    assert load.report.problems(parse_certs(bundle.read_bytes())) == []


def _children(supervisor: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(supervisor), "-f", "spawn_main"], capture_output=True, text=True)
    return {int(pid) for pid in found.stdout.split()}
