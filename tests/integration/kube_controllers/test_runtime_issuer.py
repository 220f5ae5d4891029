"""Switching the active issuer at run time through a watched ConfigMap, in every worker.

Two local CAs whose roots are both in the trust bundle: the ConfigMap moves signing from the
first to the second, a broken configuration and an untrusted CA are refused with a Warning
Event while the second keeps signing, and deleting the ConfigMap returns to the command line's
issuer. Two worker processes, so each worker's own slot must follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.integration.kube_controllers.conftest import (
    Ca,
    Workload,
    csr_service,
    make_ca,
    named_object_rules,
    new_identity,
    new_workload,
    signed_by_root,
    write_bundle,
)
from tests.support.dev_server import DevServer
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube

CALLS = 6  # several calls, so that both workers (SO_REUSEPORT) answer some


def _all_signed_by(workload: Workload, srv: DevServer, ca: Ca, out: Path) -> bool:
    for i in range(CALLS):
        result = workload.request(srv, out / str(i))
        if not signed_by_root(result.leaf, [], ca.root):
            return False
    return True


def _events(kube: KubeCluster, ns: str, name: str, reason: str) -> list[str]:
    events = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [str(e.message) for e in events if e.reason == reason]


def test_runtime_switch_between_two_issuers(kube: KubeCluster, jwks_file: Path, tmp_path: Path) -> None:
    me = new_identity(kube, tmp_path)
    cfg_name = unique_name("csr-issuer")
    me.grant(named_object_rules("configmaps", cfg_name, events=True), me.namespace)
    ca1, ca2, untrusted = make_ca(tmp_path / "ca1"), make_ca(tmp_path / "ca2"), make_ca(tmp_path / "ca3")
    bundle = write_bundle(tmp_path / "bundle.pem", ca1, ca2)
    workload = new_workload(kube)
    args = [
        *("--issuer", "local", "--local-ca-dir", str(ca1.directory), "--root-ca-file", str(bundle)),
        *("--runtime-issuer-configmap", f"{me.namespace}/{cfg_name}"),
    ]

    def put(data: dict[str, str]) -> None:
        body = k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=cfg_name), data=data)
        try:
            kube.core.replace_namespaced_config_map(cfg_name, me.namespace, body)
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise
            kube.core.create_namespaced_config_map(me.namespace, body)

    with csr_service(kube, me, jwks_file, bundle, args, tmp_path=tmp_path, workers=2) as srv:
        assert _all_signed_by(workload, srv, ca1, tmp_path / "before")

        put({"issuer": "local", "local-ca-dir": str(ca2.directory)})
        wait_for(lambda: _all_signed_by(workload, srv, ca2, tmp_path / "after"), what="signing moved to CA 2")
        wait_for(lambda: _events(kube, me.namespace, cfg_name, "IssuerChanged"), what="IssuerChanged event")
        # Each worker watches the ConfigMap on its own, and the calls above may all have reached
        # one of them: wait until both have switched, or a worker whose watch starts late first
        # sees the broken configuration below and keeps CA 1 (the check on "kept" then fails).
        wait_for(lambda: srv.log().count("runtime issuer: now signing with") >= 2, what="both workers switched to CA 2")

        # A broken configuration: refused, with an Event; CA 2 stays active.
        put({"issuer": "local", "local-ca-dir": str(tmp_path / "missing")})
        wait_for(lambda: _events(kube, me.namespace, cfg_name, "InvalidIssuerConfig"), what="rejection event")
        put({"issuer": "local", "local-ca-dirr": str(ca1.directory)})
        wait_for(
            lambda: any("local-ca-dirr" in m for m in _events(kube, me.namespace, cfg_name, "InvalidIssuerConfig")),
            what="unknown key rejected",
        )
        # A CA whose root is not in the trust bundle is refused before it signs anything.
        put({"issuer": "local", "local-ca-dir": str(untrusted.directory)})
        wait_for(
            lambda: any("trust bundle" in m for m in _events(kube, me.namespace, cfg_name, "InvalidIssuerConfig")),
            what="untrusted CA rejected",
        )
        assert _all_signed_by(workload, srv, ca2, tmp_path / "kept")

        # No ConfigMap: the command line's issuer again.
        kube.core.delete_namespaced_config_map(cfg_name, me.namespace)
        wait_for(lambda: _all_signed_by(workload, srv, ca1, tmp_path / "back"), what="back to CA 1")
    log = srv.log()
    assert log.count("runtime issuer: rejected") >= 6  # 3 configurations x 2 workers
    assert "serving certificate issued" in log
