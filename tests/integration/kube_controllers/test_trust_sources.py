"""The trust bundle from a watched ConfigMap or Secret, with read access to that one object only."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tests.integration.kube_controllers.conftest import (
    csr_service,
    make_ca,
    named_object_rules,
    new_identity,
    new_workload,
    write_bundle,
)
from tests.support.pki import certs_pem, fingerprint, load_certs
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = pytest.mark.kube


@pytest.mark.parametrize("kind", ["configmap", "secret"])
def test_trust_bundle_follows_a_configmap_or_secret(
    kube: KubeCluster, jwks_file: Path, tmp_path: Path, kind: str
) -> None:
    me = new_identity(kube, tmp_path)
    name = unique_name("trust")
    me.grant(named_object_rules(f"{kind}s", name), me.namespace)
    ca1, ca2 = make_ca(tmp_path / "ca1"), make_ca(tmp_path / "ca2")
    client_bundle = write_bundle(tmp_path / "client-bundle.pem", ca1)  # what the test client trusts

    def put(pem: str, create: bool = False) -> None:
        meta = k8s.V1ObjectMeta(name=name)
        body: Any
        fn: Any
        if kind == "configmap":
            body = k8s.V1ConfigMap(metadata=meta, data={"roots.pem": pem})
            fn = kube.core.create_namespaced_config_map if create else kube.core.replace_namespaced_config_map
        else:
            body = k8s.V1Secret(metadata=meta, data={"roots.pem": base64.b64encode(pem.encode()).decode()})
            fn = kube.core.create_namespaced_secret if create else kube.core.replace_namespaced_secret
        if create:
            fn(me.namespace, body)
        else:
            fn(name, me.namespace, body)

    put(certs_pem(ca1.root), create=True)
    workload = new_workload(kube)
    args = [
        *("--issuer", "local", "--local-ca-dir", str(ca1.directory)),
        *(f"--root-ca-{kind}", f"{me.namespace}/{name}:roots.pem"),
    ]

    def served_roots() -> set[str]:
        workload.request(srv, tmp_path / "out", root_cert=client_bundle)
        return {fingerprint(c) for c in load_certs((tmp_path / "out" / "root-cert.pem").read_bytes())}

    with csr_service(kube, me, jwks_file, client_bundle, args, tmp_path=tmp_path) as srv:
        assert served_roots() == {fingerprint(ca1.root)}
        put(certs_pem(ca1.root) + certs_pem(ca2.root))
        wait_for(lambda: served_roots() == {fingerprint(ca1.root), fingerprint(ca2.root)}, what="second root")
        # Garbage never empties the bundle: the last good roots stay.
        put("not a certificate")
        wait_for(lambda: "unusable, keeping the current roots" in srv.log(), what="bad content refused")
        assert served_roots() == {fingerprint(ca1.root), fingerprint(ca2.root)}
