"""The chart's RBAC, for real: csr-service runs with the chart's ServiceAccount and nothing else.

The rendered ServiceAccount, (Cluster)Roles and bindings are applied to the test-bed apiserver;
csr-service is started with the Deployment's own flags and a token of that ServiceAccount, and
goes through every Kubernetes-facing scenario the chart enables:

- TokenReview authentication (a Pod-bound TokenRequest token, audience istio-ca);
- the cert-manager issuer (CertificateRequests in the Issuer's namespace);
- the trust bundle from a ConfigMap (the chart's default trust source for non-local issuers);
- root CA ConfigMaps in the selected namespaces (+ the namespace watch);
- leader election (its Lease) and istiod-tls (its Secret), both leader-only;
- ztunnel impersonation (the pod cache);
- the runtime-configuration ConfigMap and the Event it records for a rejected configuration.

Then: no 403 anywhere in the log, and SubjectAccessReviews for things it must NOT be able to do.
Not covered here: the Vault issuer's RBAC (it needs none in Kubernetes: Vault's kubernetes auth
reviews the token itself) and the jwks authenticator (non-resource URLs; checked by access review).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from kubernetes import client as k8s
from kubernetes.dynamic import DynamicClient

from csr_service._generated import ca_pb2, ca_pb2_grpc
from tests.helm.chart import Manifest, container_args, render
from tests.support.certs import csr_pem
from tests.support.dev_server import CSR_SERVICE, DevServer, free_port, metric_sample, running_server
from tests.support.pki import new_key
from tests.testbed.certmanager import CertManager
from tests.testbed.kube import KubeCluster, unique_name, wait_for

pytestmark = [pytest.mark.helm, pytest.mark.kube, pytest.mark.certmanager]

RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _apply(kube: KubeCluster, manifests: list[Manifest]) -> None:
    dyn = DynamicClient(kube.api_client)
    for m in manifests:
        if m["kind"] in RBAC_KINDS:
            api = dyn.resources.get(api_version=m["apiVersion"], kind=m["kind"])
            api.create(body=m, namespace=m["metadata"].get("namespace"))


def _server_args(manifests: list[Manifest], kubeconfig: Path, grpc_port: int, http_port: int) -> list[str]:
    """The Deployment's flags (its 2 worker processes included), with loopback listeners and the
    ServiceAccount's kubeconfig."""
    args = [a for a in container_args(manifests) if not a.startswith(("--grpc-listen=", "--http-listen="))]
    return [
        *args,
        f"--grpc-listen=127.0.0.1:{grpc_port}",
        f"--http-listen=127.0.0.1:{http_port}",
        "--serving-ip-addresses=127.0.0.1",  # so the tests can dial 127.0.0.1 with TLS verification
        f"--kubeconfig={kubeconfig}",
    ]


def _can(kube: KubeCluster, user: str, verb: str, resource: str, namespace: str = "", **kw: str) -> bool:
    attrs = k8s.V1ResourceAttributes(verb=verb, resource=resource, namespace=namespace or None, **kw)
    review = k8s.V1SubjectAccessReview(spec=k8s.V1SubjectAccessReviewSpec(user=user, resource_attributes=attrs))
    status = k8s.AuthorizationV1Api(kube.api_client).create_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed)


def _impersonated_call(srv: DevServer, token: str, identity: str) -> list[str]:
    csr = csr_pem(new_key(), uris=(identity,)).decode()
    meta = struct_pb2.Struct()
    meta.update({"ImpersonatedIdentity": identity})
    with srv.channel() as ch:
        resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=3600, metadata=meta),
            metadata=(("authorization", f"Bearer {token}"), ("clusterid", "Kubernetes")),
            timeout=30,
        )
    return list(resp.cert_chain)


def test_chart_rbac_is_enough_and_no_more(kube: KubeCluster, cert_manager: CertManager, tmp_path: Path) -> None:
    release_ns = kube.create_namespace(unique_name("csr"))
    istio_ns = kube.create_namespace(unique_name("istio"))
    mesh = unique_name("mesh")
    fullname = unique_name("csr-service")
    values: dict[str, Any] = {
        "fullnameOverride": fullname,
        "app": {
            "issuer": "cert-manager",
            "certmanager": {"namespace": cert_manager.issuer_namespace, "issuer": {"name": cert_manager.issuer_name}},
            "server": {"caTrustedNodeAccounts": f"{istio_ns}/ztunnel"},
            "controller": {"leaderElectionNamespace": istio_ns, "configmapNamespaceSelector": f"csr-test={mesh}"},
            "istio": {"namespace": istio_ns},
            "runtimeConfiguration": {"name": f"{fullname}-runtime"},
        },
    }
    manifests = render(values, namespace=release_ns, release=fullname)
    _apply(kube, manifests)
    root_pem = cert_manager.issuer_ca_pem
    # The chart's default trust source for a non-local issuer: <fullname>-root-ca, key ca.crt.
    kube.core.create_namespaced_config_map(
        release_ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=f"{fullname}-root-ca"), data={"ca.crt": root_pem})
    )
    runtime_cm = f"{fullname}-runtime"
    kube.core.create_namespaced_config_map(
        release_ns,
        k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name=runtime_cm),
            data={"issuer-name": cert_manager.issuer_name, "issuer-kind": "Issuer", "issuer-group": "cert-manager.io"},
        ),
    )
    workload_ns = kube.create_namespace(labels={"csr-test": mesh})
    other_ns = kube.create_namespace()  # not selected: gets no root ConfigMap

    kubeconfig = kube.kubeconfig_for_service_account(release_ns, fullname, path=tmp_path / "kubeconfig")
    root_file = tmp_path / "root.pem"
    root_file.write_text(root_pem)
    grpc_port, http_port = free_port(), free_port()
    args = _server_args(manifests, kubeconfig, grpc_port, http_port)
    env = {"POD_NAME": f"{fullname}-0", "POD_NAMESPACE": release_ns}
    log_path = tmp_path / "server.log"
    with running_server(
        args, root_cert=root_file, state_dir=tmp_path, log_path=log_path, port=grpc_port, env=env, timeout=90
    ) as srv:
        # gRPC health answers as soon as one worker listens; /readyz waits for all of them.
        wait_for(lambda: _ready(http_port), what="/readyz 200")

        # TokenReview + cert-manager issuer: a sidecar's request.
        pod = kube.create_workload(workload_ns, "sleep")
        token_file = tmp_path / "token"
        token_file.write_text(kube.token(workload_ns, "sleep", pod=pod))
        out = subprocess.run(
            [
                *CSR_SERVICE,
                "request",
                "--ca-address",
                srv.address,
                "--root-cert",
                str(root_file),
                "--token-file",
                str(token_file),
                "--trust-domain",
                "cluster.local",
                "--namespace",
                workload_ns,
                "--service-account",
                "sleep",
                "--out-dir",
                str(tmp_path / "sleep"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr + srv.log()[-3000:]

        # Impersonation: ztunnel on node-1 asks for the identity of a pod on the same node.
        zt_pod = kube.create_workload(istio_ns, "ztunnel", node_name="node-1")
        zt_token = kube.token(istio_ns, "ztunnel", pod=zt_pod)
        target = f"spiffe://cluster.local/ns/{workload_ns}/sa/sleep"
        chain = wait_for(lambda: _try(lambda: _impersonated_call(srv, zt_token, target)), what="impersonated issue")
        assert len(chain) >= 2

        # Root ConfigMaps (selected namespaces only), leader Lease, istiod-tls.
        cm = wait_for(lambda: _read(kube.core.read_namespaced_config_map, "istio-ca-root-cert", workload_ns))
        assert cm.data["root-cert.pem"].strip() == root_pem.strip()
        assert _read(kube.core.read_namespaced_config_map, "istio-ca-root-cert", other_ns) is None
        coord = k8s.CoordinationV1Api(kube.api_client)
        lease = wait_for(lambda: _read(coord.read_namespaced_lease, fullname, istio_ns), what="lease")
        assert lease.spec.holder_identity.startswith(f"{fullname}-0")
        secret = wait_for(lambda: _read(kube.core.read_namespaced_secret, "istiod-tls", istio_ns), what="istiod-tls")
        assert b"BEGIN CERTIFICATE" in base64.b64decode(secret.data["tls.crt"])

        # Runtime configuration: a bad one is rejected with an Event on the ConfigMap.
        kube.core.patch_namespaced_config_map(runtime_cm, release_ns, {"data": {"issuer": "no-such-issuer"}})
        event = wait_for(lambda: _event(kube, release_ns, runtime_cm), what="InvalidIssuerConfig event")
        assert event.type == "Warning"

        # The same run, seen through /metrics (aggregated over both workers).
        def scraped() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            miss = 'csr_service_authn_cache_requests_total{authenticator="tokenreview",result="miss"}'
            return text if miss in text and "csr_service_leader 1.0" in text else None

        text = wait_for(scraped, what="authn cache and leader metrics")
        assert metric_sample(text, "citadel_server_success_cert_issuance_count") >= 2
        assert metric_sample(text, 'csr_service_issuer_sign_seconds_count{issuer="cert-manager"}') >= 2
        log = srv.log()

    # Nothing was forbidden at run time... (not counting the timestamps: "14:48:43,403" once
    # failed this check)
    messages = "\n".join(line.split(" ", 2)[-1] if line[:4].isdigit() else line for line in log.splitlines())
    assert not re.search(r"\b403\b", messages), log[-5000:]
    assert "forbidden" not in log.lower(), log[-5000:]
    assert "cannot record event" not in log

    # ...and nothing broader was granted than the scenarios need.
    user = f"system:serviceaccount:{release_ns}:{fullname}"
    ca_ns, ca_secret = cert_manager.issuer_namespace, cert_manager.issuer_name
    must = [
        ("create", "tokenreviews", "", {"group": "authentication.k8s.io"}),
        ("update", "secrets", istio_ns, {"name": "istiod-tls"}),
        ("watch", "secrets", istio_ns, {"name": "istiod-tls"}),
        ("create", "certificaterequests", ca_ns, {"group": "cert-manager.io"}),
        ("list", "pods", "", {}),
        ("patch", "configmaps", other_ns, {}),
    ]
    must_not = [
        ("get", "secrets", ca_ns, {"name": ca_secret}),  # the CA's private key next to the Issuer
        ("list", "secrets", istio_ns, {}),
        ("get", "secrets", release_ns, {}),
        ("list", "secrets", "", {}),
        ("delete", "secrets", istio_ns, {"name": "istiod-tls"}),
        ("create", "certificaterequests", release_ns, {"group": "cert-manager.io"}),
        ("update", "certificaterequests", ca_ns, {"group": "cert-manager.io"}),
        ("create", "certificaterequests/status", ca_ns, {"group": "cert-manager.io"}),
        ("delete", "configmaps", workload_ns, {}),
        ("get", "secrets", istio_ns, {"name": "istiod-tls"}),  # list+watch by name is all it needs
        ("update", "configmaps", release_ns, {"name": f"{fullname}-root-ca"}),
        ("update", "leases", istio_ns, {"group": "coordination.k8s.io", "name": "someone-else"}),
        ("create", "pods", workload_ns, {}),
        ("delete", "pods", workload_ns, {}),
        ("delete", "namespaces", "", {}),
        ("create", "serviceaccounts/token", workload_ns, {}),
        ("create", "certificatesigningrequests", "", {"group": "certificates.k8s.io"}),
        ("create", "events", workload_ns, {}),
        ("escalate", "clusterroles", "", {"group": "rbac.authorization.k8s.io"}),
    ]
    for verb, resource, ns, kw in must:
        assert _can(kube, user, verb, resource, ns, **kw), f"should be allowed: {verb} {resource} {ns} {kw}"
    for verb, resource, ns, kw in must_not:
        sub = {}
        if "/" in resource:
            resource, sub["subresource"] = resource.split("/")
        assert not _can(kube, user, verb, resource, ns, **kw, **sub), f"must be denied: {verb} {resource} {ns} {kw}"


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status == 200
    except urllib.error.HTTPError:
        return False


def _try(fn: Any) -> Any:
    try:
        return fn()
    except grpc.RpcError:
        return None  # e.g. the pod cache has not seen the new pods yet


def _read(read: Any, name: str, namespace: str) -> Any:
    try:
        return read(name, namespace)
    except k8s.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _event(kube: KubeCluster, namespace: str, name: str) -> Any:
    for ev in kube.core.list_namespaced_event(namespace).items:
        if ev.involved_object.name == name and ev.reason == "InvalidIssuerConfig":
            return ev
    return None


def test_jwks_needs_only_the_discovery_documents(kube: KubeCluster, tmp_path: Path) -> None:
    """With --authenticator jwks the chart grants the two discovery URLs and no TokenReview."""
    release_ns = kube.create_namespace(unique_name("csr"))
    fullname = unique_name("csr-service")
    values = {
        "fullnameOverride": fullname,
        "app": {
            "issuer": "local",
            "local": {"secretName": "ca"},
            "server": {"authenticator": "jwks"},
            "tls": {"istiodCertificateEnable": False},
            "controller": {"rootConfigMaps": False},
        },
    }
    _apply(kube, render(values, namespace=release_ns, release=fullname))
    user = f"system:serviceaccount:{release_ns}:{fullname}"
    review = k8s.V1SubjectAccessReview(
        spec=k8s.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{release_ns}", "system:authenticated"],
            non_resource_attributes=k8s.V1NonResourceAttributes(path="/openid/v1/jwks", verb="get"),
        )
    )
    status = k8s.AuthorizationV1Api(kube.api_client).create_subject_access_review(review).status
    assert status is not None
    assert status.allowed
    assert not _can(kube, user, "create", "tokenreviews", group="authentication.k8s.io")
    assert not _can(kube, user, "list", "configmaps")
    assert json.dumps(values)  # (values kept for the failure message)


@pytest.mark.istiod  # CSRs are created as istiod's ServiceAccount, as istiod creates them
def test_signer_rbac_is_enough_and_no_more(kube: KubeCluster, tmp_path: Path) -> None:
    """The Kubernetes CSR signer alone (app.signer.signerOnly) with the chart's RBAC: it signs its
    signer name's CSRs, refuses another user's with Failed and an Event, holds its Lease; nothing
    was forbidden; and it cannot sign other signer names, approve, create or delete CSRs."""
    from tests.support.certs import write_ca_dir
    from tests.support.k8s_signer import approve, create_csr, csr_failed, istiod_api, wait_outcome
    from tests.support.pki import csr_pem as pki_csr_pem
    from tests.support.waiting import wait_for as wait

    release_ns = kube.create_namespace(unique_name("csr"))
    lease_ns = kube.create_namespace(unique_name("istio"))
    fullname = unique_name("csr-service")
    signer = f"{unique_name('csr')}.test/workloads"
    values: dict[str, Any] = {
        "fullnameOverride": fullname,
        "app": {
            "issuer": "local",
            "local": {"secretName": "ca"},
            "signer": {"signerNames": [signer], "signerOnly": True},
            "tls": {"istiodCertificateEnable": False},
            "controller": {"rootConfigMaps": False, "leaderElectionNamespace": lease_ns},
        },
    }
    manifests = render(values, namespace=release_ns, release=fullname)
    _apply(kube, manifests)
    write_ca_dir(tmp_path / "ca", intermediate=True)
    kubeconfig = kube.kubeconfig_for_service_account(release_ns, fullname, path=tmp_path / "kubeconfig")
    http_port = free_port()
    args = [
        *(a for a in container_args(manifests) if not a.startswith(("--http-listen=", "--local-ca-dir="))),
        f"--http-listen=127.0.0.1:{http_port}",
        f"--local-ca-dir={tmp_path / 'ca'}",
        f"--kubeconfig={kubeconfig}",
    ]
    assert "--grpc-listen=" in args
    log_path = tmp_path / "signer.log"
    env = {**os.environ, "POD_NAME": f"{fullname}-0", "POD_NAMESPACE": release_ns}
    with log_path.open("wb") as out:
        proc = subprocess.Popen([*CSR_SERVICE, "serve", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait(lambda: "k8s signer: watching" in log_path.read_text(), timeout=60, what="the signer (leader) watching")
        as_istiod = istiod_api(kube)
        mine = create_csr(as_istiod, signer, pki_csr_pem(new_key(), uris=("spiffe://cluster.local/ns/a/sa/b",)))
        theirs = create_csr(
            k8s.CertificatesV1Api(kube.api_client),
            signer,
            pki_csr_pem(new_key(), uris=("spiffe://cluster.local/ns/a/sa/b",)),
        )
        approve(kube, mine)
        approve(kube, theirs)
        assert wait_outcome(kube, mine).status.certificate
        assert csr_failed(wait_outcome(kube, theirs)).reason == "RequesterNotAllowed"

        def event() -> Any:
            for ev in kube.core.list_namespaced_event("default").items:
                if ev.involved_object.name == theirs and ev.reason == "RequesterNotAllowed":
                    return ev
            return None

        assert wait(event, what="the Failed CSR's Event").type == "Warning"
        assert kube.lease_holder(lease_ns, fullname).startswith(f"{fullname}-0")
    finally:
        proc.terminate()
        proc.wait(30)
    log = log_path.read_text()
    messages = "\n".join(line.split(" ", 2)[-1] if line[:4].isdigit() else line for line in log.splitlines())
    assert not re.search(r"\b403\b", messages), log[-5000:]
    assert "forbidden" not in log.lower(), log[-5000:]
    assert "cannot record event" not in log

    user = f"system:serviceaccount:{release_ns}:{fullname}"
    csrs = {"group": "certificates.k8s.io"}
    assert _can(kube, user, "sign", "signers", **csrs, name=signer)
    assert _can(kube, user, "update", "certificatesigningrequests", subresource="status", **csrs)
    must_not = [
        ("sign", "signers", {"name": f"{unique_name('other')}.test/workloads"}),
        ("sign", "signers", {"name": "kubernetes.io/kube-apiserver-client"}),
        ("approve", "signers", {"name": signer}),
        ("create", "certificatesigningrequests", {}),
        ("delete", "certificatesigningrequests", {}),
        ("update", "certificatesigningrequests", {}),
        ("update", "certificatesigningrequests", {"subresource": "approval"}),
    ]
    for verb, resource, kw in must_not:
        assert not _can(kube, user, verb, resource, **csrs, **kw), f"must be denied: {verb} {resource} {kw}"
    assert not _can(kube, user, "create", "tokenreviews", group="authentication.k8s.io")  # no gRPC: no authn
    assert not _can(kube, user, "create", "events", "kube-system")
