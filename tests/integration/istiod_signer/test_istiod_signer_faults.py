"""The signer on a private apiserver (``own_kube``, free to restart): istiod's own serving
certificate from csr-service (PILOT_CERT_PROVIDER=k8s.io/<signer>), an apiserver restart with
CSRs pending, and two replicas with a leader change under load."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import pytest

from tests.integration.istiod_signer.support import ca_dir, istiod_ra, sidecar_request, signer_domain
from tests.support import pki
from tests.support.k8s_signer import approve, create_csr, istiod_api, running_signer, wait_outcome
from tests.support.waiting import wait_for
from tests.testbed.istio import IstioClient
from tests.testbed.kube import KubeCluster

pytestmark = [pytest.mark.istiod, pytest.mark.istio, pytest.mark.kube]


def _csr(uri: str = "spiffe://cluster.local/ns/default/sa/load") -> bytes:
    return pki.csr_pem(pki.new_key(), uris=(uri,))


def test_istiod_serving_certificate_from_csr_service(
    own_kube: KubeCluster, istio_client: IstioClient, tmp_path: Path
) -> None:
    """Start order: csr-service first (istiod exits after 60 s without a signer); istiod's own
    DNS certificate is then signed on the signer name allowed for it, chains to our root, and that
    root is what istiod publishes and verifies with."""
    domain = signer_domain()
    root = ca_dir(tmp_path / "ca")
    istiod_signer, workloads = f"{domain}/istiod", f"{domain}/workloads"
    args = [f"--local-ca-dir={tmp_path / 'ca'}", f"--k8s-signer-istiod-signer-names={istiod_signer}"]
    with running_signer(own_kube, tmp_path, [istiod_signer, workloads], args) as csr_service:
        istiod = istiod_ra(
            own_kube,
            tmp_path / "istiod",
            root=root,
            k8s_signer=workloads,
            mesh_roots={istiod_signer: root},
            extra_env={"PILOT_CERT_PROVIDER": f"k8s.io/{istiod_signer}"},
        )
        try:
            # The sidecar verifies istiod's serving certificate with OUR root (not a self-signed one).
            res, spiffe = sidecar_request(
                own_kube, istiod, istio_client, tmp_path, istiod_root=pki.certs_pem(root).encode()
            )
            published = istiod.root_cert()
        finally:
            istiod.stop()
        log = csr_service.log()

    assert res.ok, f"{res.code}: {res.message}\n{log[-3000:]}"
    assert pki.spiffe_uris(res.leaf) == [spiffe]
    assert res.certificates[-1] == root
    assert pki.load_certs(published) == [root]
    assert f"({istiod_signer})" in log  # istiod's own CSR was signed on its signer name


def test_apiserver_restart_with_pending_csrs(own_kube: KubeCluster, tmp_path: Path) -> None:
    """CSRs created before the signer runs, and while it is frozen across an apiserver restart,
    are all signed once it runs again (re-list, reconnect)."""
    signer = f"{signer_domain()}/workloads"
    root = ca_dir(tmp_path / "ca")
    as_istiod = istiod_api(own_kube)
    before = create_csr(as_istiod, signer, _csr())
    approve(own_kube, before)
    with running_signer(own_kube, tmp_path, [signer], [f"--local-ca-dir={tmp_path / 'ca'}"]) as csr_service:
        wait_outcome(own_kube, before)
        csr_service.pause()  # its watch connection is there, but nothing is read from it
        try:
            pending = []
            for _ in range(8):
                name = create_csr(as_istiod, signer, _csr())
                approve(own_kube, name)
                pending.append(name)
            own_kube.restart_apiserver()
        finally:
            csr_service.resume()
        # Signing them needed a new watch connection: the old one died with the apiserver.
        outcomes = [wait_outcome(own_kube, name, timeout=90) for name in [before, *pending]]
        log = csr_service.log()

    for csr in outcomes:
        assert csr.status.certificate, (csr.metadata.name, csr.status, log[-3000:])
        certs = pki.load_certs(base64.b64decode(csr.status.certificate))
        pki.verify_chain(certs[0], certs[1:], [root])


def test_two_replicas_leader_change_under_load(kube: KubeCluster, tmp_path: Path) -> None:
    """CSRs keep coming while the leading replica is killed: every one gets a certificate, and no
    CSR is signed by both replicas (leader election decides who signs; the resourceVersion on the
    status write keeps a late write of the old leader from replacing the new one's)."""
    signer = f"{signer_domain()}/workloads"
    root = ca_dir(tmp_path / "ca")
    lease_ns = kube.create_namespace()
    ns = kube.create_namespace()
    common = [
        f"--local-ca-dir={tmp_path / 'ca'}",
        "--leader-election",
        f"--leader-election-namespace={lease_ns}",
        "--leader-election-lease-name=csr-signer",
        "--leader-election-lease-duration=4s",
        "--leader-election-renew-deadline=3s",
        "--leader-election-retry-period=1s",
    ]
    as_istiod = istiod_api(kube)
    created: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and len(created) < 200:
            name = create_csr(as_istiod, signer, _csr())
            approve(kube, name)
            created.append(name)
            time.sleep(0.05)

    with (
        running_signer(
            kube,
            tmp_path / "a",
            [signer],
            [*common, "--leader-election-identity=replica-a"],
            namespace=ns,
            lease_namespace=lease_ns,
            wait_watching=False,
        ) as a,
        running_signer(
            kube,
            tmp_path / "b",
            [signer],
            [*common, "--leader-election-identity=replica-b"],
            namespace=ns,
            rbac=False,
            wait_watching=False,
        ) as b,
    ):
        holder = wait_for(lambda: kube.lease_holder(lease_ns, "csr-signer"), timeout=30, what="a leader")
        leader, follower = (a, b) if holder == "replica-a" else (b, a)
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            wait_for(lambda: len(created) >= 20, timeout=60, what="20 CSRs created")
            leader.kill()
            new = "replica-b" if holder == "replica-a" else "replica-a"
            wait_for(lambda: kube.lease_holder(lease_ns, "csr-signer") == new, timeout=30, what="the takeover")
            at_takeover = len(created)
            wait_for(lambda: len(created) >= at_takeover + 20, timeout=60, what="20 more CSRs")
        finally:
            stop.set()
            worker.join(30)
        outcomes = {name: wait_outcome(kube, name, timeout=60) for name in created}
        logs = (leader.log(), follower.log())

    for name, csr in outcomes.items():
        assert csr.status.certificate, (name, csr.status)
        certs = pki.load_certs(base64.b64decode(csr.status.certificate))
        pki.verify_chain(certs[0], certs[1:], [root])
        by = [log.count(f"signed CSR {name} ") for log in logs]
        assert sum(by) <= 1, (name, by)  # never both (0: the killed leader wrote, then died before its log line)
    signed_by_follower = sum(logs[1].count(f"signed CSR {name} ") for name in outcomes)
    assert signed_by_follower >= 20  # the new leader signed what came after the takeover
