"""Root CA ConfigMaps across namespaces, against the real apiserver, with only the RBAC they need.

One csr-service (no leader election) publishes the bundle of ``--root-ca-file``; the test
then tampers, deletes, adds namespaces, changes the roots (one → two roots, the serving
certificate follows) and changes a namespace's labels so it leaves the selector.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s

from tests.integration.kube_controllers.conftest import (
    ROOT_CONFIGMAP_RULES,
    csr_service,
    make_ca,
    new_identity,
    new_workload,
    write_bundle,
)
from tests.support.pki import fingerprint, load_certs
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube

CM = "istio-ca-root-cert"


def _data(kube: KubeCluster, ns: str) -> dict[str, str] | None:
    try:
        cm = kube.core.read_namespaced_config_map(CM, ns)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    labels = (cm.metadata.labels if cm.metadata else None) or {}
    return dict(cm.data or {}) | {"__label": labels.get("istio.io/config", "")}


def _has(kube: KubeCluster, ns: str, pem: str) -> bool:
    data = _data(kube, ns)
    return bool(data and data.get("root-cert.pem") == pem and data["__label"] == "true")


def test_root_configmaps_follow_namespaces_edits_and_root_changes(
    kube: KubeCluster, jwks_file: Path, tmp_path: Path
) -> None:
    me = new_identity(kube, tmp_path)
    me.grant(ROOT_CONFIGMAP_RULES)
    ca1, ca2 = make_ca(tmp_path / "ca1"), make_ca(tmp_path / "ca2")
    bundle = write_bundle(tmp_path / "bundle.pem", ca1)
    pem1 = bundle.read_text()
    label = unique_name("mesh")
    selected = {"csr-test": label}
    ns_a = kube.create_namespace(labels=selected)
    ns_b = kube.create_namespace(labels=selected)
    ns_other = kube.create_namespace(labels={"csr-test": "elsewhere"})
    workload = new_workload(kube)

    args = [
        *("--issuer", "local", "--local-ca-dir", str(ca1.directory), "--root-ca-file", str(bundle)),
        *("--root-configmaps", "--root-configmap-namespace-selector", f"csr-test={label}"),
    ]
    with csr_service(kube, me, jwks_file, bundle, args, tmp_path=tmp_path) as srv:
        # Created in every selected namespace, nowhere else.
        wait_for(lambda: _has(kube, ns_a, pem1) and _has(kube, ns_b, pem1), what="ConfigMaps in selected namespaces")
        assert _data(kube, ns_other) is None

        # A key someone else owns survives our writes.
        kube.core.patch_namespaced_config_map(CM, ns_a, {"data": {"extra.pem": "not ours"}})
        # Tampering is repaired.
        kube.core.patch_namespaced_config_map(CM, ns_a, {"data": {"root-cert.pem": "tampered"}})
        wait_for(lambda: _has(kube, ns_a, pem1), what="tampered ConfigMap repaired")
        # A removed label is put back.
        kube.core.patch_namespaced_config_map(CM, ns_b, {"metadata": {"labels": {"istio.io/config": None}}})
        wait_for(lambda: _has(kube, ns_b, pem1), what="label restored")
        # Deletion is repaired.
        kube.core.delete_namespaced_config_map(CM, ns_b)
        wait_for(lambda: _has(kube, ns_b, pem1), what="deleted ConfigMap recreated")
        # A new namespace gets one.
        ns_new = kube.create_namespace(labels=selected)
        wait_for(lambda: _has(kube, ns_new, pem1), what="ConfigMap in a new namespace")

        # Rotation, step 1: old + new root. ConfigMaps, and the TLS server, follow without restart.
        write_bundle(bundle, ca1, ca2)
        pem12 = bundle.read_text()
        for ns in (ns_a, ns_b, ns_new):
            wait_for(lambda ns=ns: _has(kube, ns, pem12), timeout=60, what=f"two roots in {ns}")
        assert _data(kube, ns_a)["extra.pem"] == "not ours"  # type: ignore[index]
        result = workload.request(srv, tmp_path / "w1")
        served_roots = load_certs((tmp_path / "w1" / "root-cert.pem").read_bytes())
        assert {fingerprint(r) for r in served_roots} == {fingerprint(ca1.root), fingerprint(ca2.root)}
        assert result.chain_len == 2  # leaf (signed by root 1), then the two-root bundle
        # The TLS server follows too: the serving certificate was reissued for the new bundle.
        assert srv.log().count("serving certificate issued") >= 2

        # A namespace that leaves the selector keeps its ConfigMap, no longer updated.
        kube.core.patch_namespace(ns_b, {"metadata": {"labels": {"csr-test": "left"}}})
        write_bundle(bundle, ca1)
        wait_for(lambda: _has(kube, ns_a, pem1) and _has(kube, ns_new, pem1), timeout=60, what="back to one root")
        assert _has(kube, ns_b, pem12), "a namespace outside the selector must be left alone"
        assert _data(kube, ns_other) is None
    assert "Forbidden" not in srv.log()
