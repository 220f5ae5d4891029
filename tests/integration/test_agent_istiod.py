"""``csr-service agent`` against Istio's real istiod built-in CA (pilot-discovery from the test bed):
the same client works against any Istio CA. Files with the right modes and content, a chain that
verifies against istiod's published root, and rotation of short-lived certificates seen several
times (istiod accepts any positive TTL up to its maximum: a 20 s request gets a 20 s certificate,
NotBefore backdated as istiod does)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.support import pki
from tests.support.agent import agent_args, run_agent_once, running_agent
from tests.support.waiting import wait_for
from tests.testbed.istiod import ISTIOD_SAN, Istiod
from tests.testbed.kube import KubeCluster

pytestmark = [pytest.mark.istiod, pytest.mark.kube]


def _setup(kube: KubeCluster, istiod: Istiod, tmp_path: Path, sa: str) -> tuple[str, list[str]]:
    ns = kube.create_namespace()
    pod = kube.create_workload(ns, sa)
    token = tmp_path / "istio-token"
    token.write_text(kube.token(ns, sa, pod=pod))
    root = tmp_path / "root-cert.pem"
    root.write_bytes(istiod.root_cert())
    args = agent_args(ca_address=istiod.ca_address, root_cert=root, token_file=token, out_dir=tmp_path / "certs")
    return ns, [*args, "--tls-server-name", ISTIOD_SAN]


def test_once_against_istiod(kube: KubeCluster, istiod: Istiod, tmp_path: Path) -> None:
    ns, args = _setup(kube, istiod, tmp_path, "prometheus")
    res = run_agent_once([*args, "--key-type", "rsa2048", "--ttl", "1h"])
    assert res.returncode == 0, res.stderr
    out = tmp_path / "certs"
    chain = pki.load_certs((out / "cert-chain.pem").read_bytes())
    key = pki.load_key((out / "key.pem").read_bytes())
    roots = pki.load_certs((out / "root-cert.pem").read_bytes())
    assert roots == pki.load_certs(istiod.root_cert())
    assert pki.spiffe_uris(chain[0]) == [f"spiffe://cluster.local/ns/{ns}/sa/prometheus"]
    assert pki.key_matches(chain[0], key)
    pki.verify_chain(chain[0], chain[1:], roots)
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3600 + 600  # what we asked, plus istiod's backdating


def test_rotation_against_istiod(kube: KubeCluster, istiod: Istiod, tmp_path: Path) -> None:
    _, args = _setup(kube, istiod, tmp_path, "scraper")
    fast = ["--ttl", "20s", "--renew-at", "0.5", "--renew-jitter", "0", "--check-interval", "1s"]
    out = tmp_path / "certs"
    with running_agent([*args, *fast], tmp_path / "agent.log") as agent:
        serials: set[int] = set()
        roots = pki.load_certs(istiod.root_cert())

        def seen_four() -> bool:
            chain = pki.load_certs((out / "..data" / "cert-chain.pem").read_bytes())
            key = pki.load_key((out / "..data" / "key.pem").read_bytes())
            assert pki.key_matches(chain[0], key)
            pki.verify_chain(chain[0], chain[1:], roots)
            serials.add(chain[0].serial_number)
            return len(serials) >= 4

        wait_for(seen_four, timeout=120, interval=0.5, what="three renewals from istiod", ignoring=(FileNotFoundError,))
        assert agent.ready()
        leaf = pki.load_certs((out / "cert-chain.pem").read_bytes())[0]
        # istiod honoured the short TTL (NotAfter about 20 s after it signed).
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 20 + 600
        assert agent.metric_sum(r'csr_service_agent_rotations_total\{.*reason="renewal".*\}') >= 3
        assert agent.metric_sum(r"csr_service_agent_failures_total\{.*\}") == 0, agent.log()


def test_root_change_followed_against_istiod(own_kube: KubeCluster, tmp_path: Path) -> None:
    """istiod with a plugged-in CA (``./etc/cacerts``), reloaded in place with a new root (istiod
    needs ``ISTIO_MULTIROOT_MESH=true`` for that; without it, it logs "updating new ROOT-CA not
    supported"). The agent's root file is then updated like the istio-ca-root-cert ConfigMap
    (new + old root); the agent reconnects, renews at once, and the new certificate chains to the
    new root. A private apiserver: this istiod must not fight the session istiod over the
    root ConfigMaps."""
    from tests.support.certs import write_ca_dir
    from tests.testbed.istiod import start_istiod

    workdir = tmp_path / "istiod"
    _, _, old_root = write_ca_dir(workdir / "etc" / "cacerts", intermediate=True)
    istiod = start_istiod(own_kube, workdir, env={"ISTIO_MULTIROOT_MESH": "true"})
    try:
        _, args = _setup(own_kube, istiod, tmp_path, "exporter")
        assert pki.load_certs((tmp_path / "root-cert.pem").read_bytes()) == [old_root]
        out = tmp_path / "certs"
        with running_agent([*args, "--ttl", "1h", "--check-interval", "1s"], tmp_path / "agent.log") as agent:
            wait_for(agent.ready, timeout=60, what="a first certificate", ignoring=(OSError,))
            first = pki.load_certs((out / "cert-chain.pem").read_bytes())
            pki.verify_chain(first[0], first[1:], [old_root])
            _, _, new_root = write_ca_dir(workdir / "etc" / "cacerts", intermediate=True)
            with (workdir / "etc" / "cacerts" / "root-cert.pem").open("a") as fh:
                fh.write(pki.certs_pem(old_root))

            def published_both() -> bytes | None:
                pem = istiod.root_cert()
                return pem if new_root in pki.load_certs(pem) else None

            bundle = wait_for(published_both, timeout=60, what="istiod to publish the new root")
            (tmp_path / "root-cert.pem").write_bytes(bundle)  # what the kubelet does to the mount

            def under_new_root() -> bool:
                chain = pki.load_certs((out / "..data" / "cert-chain.pem").read_bytes())
                pki.verify_chain(chain[0], chain[1:], [new_root])
                return True

            wait_for(
                under_new_root, timeout=60, interval=0.5, what="a certificate under the new root", ignoring=(Exception,)
            )
            assert new_root in pki.load_certs((out / "root-cert.pem").read_bytes())
            assert agent.metric_sum(r'csr_service_agent_rotations_total\{.*reason="root-changed".*\}') >= 1
            assert agent.ready()
    finally:
        istiod.stop()
