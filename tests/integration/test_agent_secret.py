"""``csr-service agent --output-secret`` against the real apiserver, with the exact Role of
``examples/agent/gateway-secret-writer.yaml`` (least privilege) and ``serve --dev`` as the CA.

- one write creates or updates the kubernetes.io/tls Secret; keys, labels and annotations of
  others stay; a Secret of another type is refused with a clear message; a Secret the Role does
  not cover is PERMISSION_DENIED;
- two agents, one Lease: only the holder writes; when it is killed the other takes over; every
  version of the Secret the watch ever shows is a whole, consistent set.
"""

from __future__ import annotations

import base64
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import watch

from tests.support import pki
from tests.support.agent import agent_args, run_agent_once, running_agent
from tests.support.dev_server import DevServer, running_dev_server
from tests.support.waiting import wait_for
from tests.testbed.kube import KubeCluster

pytestmark = pytest.mark.kube

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "agent" / "gateway-secret-writer.yaml"
SECRET, LEASE, SA = "gateway-cert", "gateway-cert-writer", "gateway"
OUR_KEYS = {"tls.crt", "tls.key", "ca.crt", "cert-chain.pem", "key.pem", "root-cert.pem"}


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    with running_dev_server(tmp_path_factory.mktemp("ca") / "state") as srv:
        yield srv


def _example_objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def _namespace_with_agent_rbac(kube: KubeCluster) -> str:
    """A namespace with ServiceAccount ``gateway`` bound to the example's Role, verbatim."""
    ns = kube.create_namespace()
    kube.create_service_account(ns, SA)
    rbac = k8s.RbacAuthorizationV1Api(kube.api_client)
    for obj in _example_objects():
        if obj["kind"] == "Role":
            rbac.create_namespaced_role(ns, obj)
        elif obj["kind"] == "RoleBinding":
            rbac.create_namespaced_role_binding(ns, obj)
    return ns


def _args(kube: KubeCluster, ca: DevServer, ns: str, tmp: Path, *extra: str) -> list[str]:
    token = tmp / f"istio-token-{ns}"
    token.write_text(ca.token(ns, SA))
    kubeconfig = kube.kubeconfig_for_service_account(ns, SA, path=tmp / f"kubeconfig-{ns}")
    base = agent_args(ca_address=ca.address, root_cert=ca.root_cert, token_file=token)
    return [*base, "--output-secret", SECRET, "--kubeconfig", str(kubeconfig), *extra]


def _decoded(secret: k8s.V1Secret) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


def _check_whole(data: dict[str, bytes], ns: str, roots: list[Any]) -> None:
    """One consistent set: both layouts agree, the key is the certificate's, the chain verifies."""
    assert set(data) >= OUR_KEYS, f"missing {OUR_KEYS - set(data)}"
    assert data["tls.crt"] == data["cert-chain.pem"]
    assert data["tls.key"] == data["key.pem"]
    assert data["ca.crt"] == data["root-cert.pem"]
    chain = pki.load_certs(data["tls.crt"])
    assert pki.key_matches(chain[0], pki.load_key(data["tls.key"]))
    assert pki.spiffe_uris(chain[0]) == [f"spiffe://cluster.local/ns/{ns}/sa/{SA}"]
    pki.verify_chain(chain[0], chain[1:], roots)


def test_secret_written_with_least_privilege_keeping_foreign_keys(
    kube: KubeCluster, dev_ca: DevServer, tmp_path: Path
) -> None:
    ns = _namespace_with_agent_rbac(kube)
    kube.core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=SECRET, labels={"team": "edge"}, annotations={"keep": "me"}),
            type="kubernetes.io/tls",
            data={"tls.crt": "", "tls.key": "", "extra.conf": base64.b64encode(b"foreign").decode()},
        ),
    )
    res = run_agent_once(_args(kube, dev_ca, ns, tmp_path))
    assert res.returncode == 0, res.stderr
    secret = kube.core.read_namespaced_secret(SECRET, ns)
    data = _decoded(secret)
    _check_whole(data, ns, pki.load_certs(dev_ca.root_cert.read_bytes()))
    assert data["extra.conf"] == b"foreign"
    assert secret.metadata.labels == {"team": "edge"}
    assert secret.metadata.annotations["keep"] == "me"
    assert "BEGIN" not in res.stdout + res.stderr

    # Created from nothing too (in a fresh namespace).
    ns2 = _namespace_with_agent_rbac(kube)
    assert run_agent_once(_args(kube, dev_ca, ns2, tmp_path)).returncode == 0
    created = kube.core.read_namespaced_secret(SECRET, ns2)
    assert created.type == "kubernetes.io/tls"
    assert set(_decoded(created)) == OUR_KEYS

    # A Secret of that name but another type: refused, untouched.
    ns3 = _namespace_with_agent_rbac(kube)
    kube.core.create_namespaced_secret(
        ns3, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=SECRET), type="Opaque", data={"a": "Yg=="})
    )
    res = run_agent_once(_args(kube, dev_ca, ns3, tmp_path))
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1].startswith("FAILED_PRECONDITION: ")
    assert "'Opaque'" in res.stderr
    assert _decoded(kube.core.read_namespaced_secret(SECRET, ns3)) == {"a": b"b"}

    # The Role covers one Secret: another name is PERMISSION_DENIED, named as such.
    args = _args(kube, dev_ca, ns, tmp_path)
    args[args.index(SECRET)] = "other-cert"
    res = run_agent_once(args)
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1].startswith("PERMISSION_DENIED: ")


class _SecretWatch:
    """Every version of one Secret, as a watch delivers them (from a thread)."""

    def __init__(self, kube: KubeCluster, ns: str) -> None:
        self.versions: list[k8s.V1Secret] = []
        self._stopped = False
        self._w = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(kube, ns), daemon=True)
        self._thread.start()

    def _run(self, kube: KubeCluster, ns: str) -> None:
        try:
            for ev in self._w.stream(
                kube.core.list_namespaced_secret, ns, field_selector=f"metadata.name={SECRET}", timeout_seconds=300
            ):
                if ev["type"] in ("ADDED", "MODIFIED"):
                    self.versions.append(ev["object"])
        except Exception:
            if not self._stopped:
                raise

    def writers(self, since: int = 0) -> list[str]:
        return [
            (v.metadata.annotations or {}).get("agent.csr-service.io/written-by", "") for v in self.versions[since:]
        ]

    def stop(self) -> None:
        self._stopped = True
        self._w.stop()
        self._thread.join(10)


def _identity(log: str) -> str:
    m = re.search(r"leader election: lease \S+ as (\S+)", log)
    assert m, log
    return m.group(1)


def test_two_agents_one_lease_one_writer_and_takeover(kube: KubeCluster, dev_ca: DevServer, tmp_path: Path) -> None:
    ns = _namespace_with_agent_rbac(kube)
    kube.core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=SECRET, labels={"team": "edge"}),
            type="kubernetes.io/tls",
            data={"tls.crt": "", "tls.key": "", "extra.conf": base64.b64encode(b"foreign").decode()},
        ),
    )
    roots = pki.load_certs(dev_ca.root_cert.read_bytes())
    fast = ["--ttl", "1m", "--renew-at", "0.1", "--renew-jitter", "0", "--check-interval", "1s"]
    lease = ["--leader-election-id", LEASE, "--lease-duration", "4s", "--renew-deadline", "3s", "--retry-period", "1s"]
    w = _SecretWatch(kube, ns)
    try:
        with running_agent(_args(kube, dev_ca, ns, tmp_path, *fast, *lease), tmp_path / "a.log") as a:
            wait_for(lambda: "leader election: lease" in a.log(), what="agent a to start")
            first = _identity(a.log())
            wait_for(
                lambda: kube.lease_holder(ns, LEASE) == first and first in w.writers(),
                timeout=30,
                what="agent a to lead and write",
            )
            with running_agent(_args(kube, dev_ca, ns, tmp_path, *fast, *lease), tmp_path / "b.log") as b:
                wait_for(lambda: "leader election: lease" in b.log(), what="agent b to start")
                second = _identity(b.log())
                since = len(w.versions)
                # Several renewals while both run: all by the holder, none by b.
                wait_for(lambda: len(w.versions) >= since + 3, timeout=60, what="three renewals with two agents")
                assert set(w.writers(since)) == {first}
                assert b.ready()
                assert "standby" in b.readyz()[1]
                assert b.metric_sum(r"csr_service_agent_leader") == 0
                assert a.metric_sum(r"csr_service_agent_leader") == 1
                # The leader dies without releasing the Lease: b takes over once it expires.
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait()
                wait_for(lambda: kube.lease_holder(ns, LEASE) == second, timeout=30, what="b to take the Lease")
                taken = len(w.versions)
                wait_for(lambda: second in w.writers(taken), timeout=30, what="b to write the Secret")
                assert set(w.writers(taken)) == {second}
                assert "kept the certificate already there" in b.log() or "wrote a certificate" in b.log()

                # Leadership changes are Events on the Lease (the Role's events/create rule).
                def elected() -> set[str]:
                    events = kube.core.list_namespaced_event(ns).items
                    return {
                        e.message.split()[0]
                        for e in events
                        if e.reason == "LeaderElected" and e.involved_object.name == LEASE
                    }

                wait_for(lambda: elected() >= {first, second}, timeout=20, what="LeaderElected events")
    finally:
        w.stop()
    assert len(w.versions) >= 6
    for v in w.versions[1:]:  # the first is the placeholder created above
        data = _decoded(v)
        _check_whole(data, ns, roots)
        assert data["extra.conf"] == b"foreign"
        assert (v.metadata.labels or {}) == {"team": "edge"}
