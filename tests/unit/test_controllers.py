"""Controllers without an apiserver: settings, root ConfigMap reconciliation, istiod certificate
decisions and issuance, runtime issuer selection and switching (in-memory fakes)."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client as k8s

from csr_service.common.errors import ConfigError
from csr_service.config import Config, resolve
from csr_service.controllers.istiod_cert import IstiodCertController, IstiodCertSpec, renewal_reason
from csr_service.controllers.root_configmaps import RootConfigMapController, desired_configmap, is_up_to_date
from csr_service.controllers.runtime_issuer import RuntimeIssuerController, issuer_values_from_configmap
from csr_service.kube.refs import ObjectRef, parse_object_ref
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pki.keys import KeyType
from csr_service.plugins.issuer import Issuer
from csr_service.plugins.registry import create_issuer
from csr_service.plugins.runtime import Runtime
from csr_service.trust.bundle import TrustBundle
from tests.support.certs import write_ca_dir
from tests.support.kube import FakeWatches
from tests.support.pki import certs_pem, key_matches, load_certs, load_key, verify_chain

# --- settings ------------------------------------------------------------------------------


def config(**flags: Any) -> Config:
    return Config.from_values(resolve({k.replace("_", "-"): v for k, v in flags.items()}, {}))


def test_controllers_are_off_by_default() -> None:
    c = config().controllers
    assert c is not None
    assert not c.needs_kube
    assert c.root_configmap_name == "istio-ca-root-cert"
    assert c.istio_revisions == ("default",)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"leader_election": "true", "leader_election_renew_deadline": "20s"}, "--leader-election-retry-period"),
        ({"istiod_cert": "true", "istiod_cert_renew_before": "2h"}, "--istiod-cert-renew-before"),
        ({"istiod_cert_key_type": "dsa"}, "--istiod-cert-key-type"),
        ({"runtime_issuer_configmap": "just-a-name"}, "--runtime-issuer-configmap"),
        ({"root_ca_configmap": "a/b", "root_ca_secret": "a/c"}, "one trust source"),
        ({"root_configmap_workers": "0"}, "--root-configmap-workers"),
    ],
)
def test_bad_settings_name_the_flag(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**flags)


def test_object_refs() -> None:
    assert parse_object_ref("ns/name", "x") == ObjectRef("ns", "name")
    assert parse_object_ref("ns/name:tls.crt", "x", with_key=True) == ObjectRef("ns", "name", "tls.crt")
    assert parse_object_ref("ns/name", "x", with_key=True, default_key="ca.crt").key == "ca.crt"
    with pytest.raises(ConfigError, match="--x"):
        parse_object_ref("NS/name", "x")


# --- root ConfigMaps ---------------------------------------------------------------------


def cm(data: dict[str, str] | None, labels: dict[str, str] | None = None) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="istio-ca-root-cert", labels=labels), data=data)


def test_up_to_date_needs_our_key_and_label_only() -> None:
    ours = {"istio.io/config": "true"}
    assert is_up_to_date(cm({"root-cert.pem": "P", "foreign": "x"}, ours), "P")
    assert not is_up_to_date(cm({"root-cert.pem": "P"}), "P")
    assert not is_up_to_date(cm({"root-cert.pem": "old"}, ours), "P")
    assert not is_up_to_date(None, "P")
    body = desired_configmap("istio-ca-root-cert", "ns", "P")
    assert body["data"] == {"root-cert.pem": "P"}  # apply owns only this key
    assert body["metadata"]["labels"] == ours


def ns(name: str, phase: str = "Active") -> k8s.V1Namespace:
    return k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name), status=k8s.V1NamespaceStatus(phase=phase))


def test_root_configmap_reconcile_writes_only_what_is_needed(tmp_path: Path) -> None:
    _, _, root = write_ca_dir(tmp_path / "ca")
    trust = TrustBundle([root])
    current = cm({"root-cert.pem": trust.current.pem}, {"istio.io/config": "true"})
    watches = FakeWatches(
        {
            "namespaces": {"a": ns("a"), "b": ns("b"), "gone": ns("gone", "Terminating")},
            "root-configmaps": {"b/istio-ca-root-cert": current},
        }
    )
    written: list[tuple[str, str]] = []
    ctl = RootConfigMapController(
        None, trust, workers=0, watch=watches, write=lambda namespace, pem: written.append((namespace, pem))
    )

    async def run() -> None:
        await ctl.start()
        try:
            for name in ("a", "b", "gone", "unselected"):
                await ctl.reconcile(name)
        finally:
            await ctl.stop()

    asyncio.run(run())
    assert written == [("a", trust.current.pem)]
    assert ctl.stats["skipped"] == 2  # terminating, and not selected


def test_root_change_queues_every_selected_namespace_once(tmp_path: Path) -> None:
    _, _, root1 = write_ca_dir(tmp_path / "ca1")
    _, _, root2 = write_ca_dir(tmp_path / "ca2")
    trust = TrustBundle([root1])
    watches = FakeWatches({"namespaces": {"a": ns("a"), "b": ns("b")}})
    ctl = RootConfigMapController(None, trust, workers=0, watch=watches)  # no workers: the queue stays as filled

    async def run() -> tuple[str, ...]:
        await ctl.start()
        try:
            watches["namespaces"].emit("ADDED", ns("a"))
            trust.update([root1, root2])
            watches["namespaces"].emit("DELETED", ns("b"))  # left alone, not queued again
            return ctl.queued
        finally:
            await ctl.stop()

    assert asyncio.run(run()) == ("a", "b")


# --- istiod certificate --------------------------------------------------------------------


def spec(**kw: Any) -> IstiodCertSpec:
    values: dict[str, Any] = {
        "namespace": "istio-system",
        "revisions": ("default", "canary"),
        "trust_domain": "cluster.local",
        "duration": timedelta(hours=1),
        "renew_before": timedelta(minutes=30),
        "key_type": KeyType.EC_P256,
        "additional_dns_names": ("istiod.example.com",),
    }
    values.update(kw)
    return IstiodCertSpec(**values)


def local_issuer(directory: Path) -> Issuer:
    issuer = create_issuer(
        "local",
        {"local-ca-dir": str(directory), "local-ca-reload-interval": timedelta(0)},
        Runtime(trust_domain="cluster.local"),
    )
    asyncio.run(issuer.start())  # type: ignore[attr-defined]
    return issuer


def test_istiod_names_follow_revisions() -> None:
    s = spec()
    assert s.dns_names == ("istiod.istio-system.svc", "istiod-canary.istio-system.svc", "istiod.example.com")
    assert s.uri == "spiffe://cluster.local/ns/istio-system/sa/istiod-service-account"


def _issue(tmp_path: Path, s: IstiodCertSpec, ca_dir: Path, trust: TrustBundle) -> k8s.V1Secret:
    captured: dict[str, bytes] = {}
    existing: list[Any] = []

    def write(data: dict[str, bytes], secret: Any) -> None:
        captured.update(data)
        existing.append(secret)

    ctl = IstiodCertController(None, IssuerSlot(local_issuer(ca_dir)), trust, s, write=write)
    asyncio.run(ctl.issue_and_write("missing"))  # not started: no watch, so the write is a create
    assert existing == [None]
    return k8s.V1Secret(data={k: base64.b64encode(v).decode() for k, v in captured.items()})


def test_istiod_secret_is_whole_and_verifies(tmp_path: Path) -> None:
    _, _, root = write_ca_dir(tmp_path / "ca", intermediate=True)
    trust = TrustBundle([root])
    s = spec()
    secret = _issue(tmp_path, s, tmp_path / "ca", trust)
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    certs = load_certs(data["tls.crt"])
    assert len(certs) == 2  # leaf + intermediate; the root is in ca.crt
    assert key_matches(certs[0], load_key(data["tls.key"]))
    assert verify_chain(certs[0], certs[1:], [root]) == [*certs, root]
    assert data["ca.crt"].decode() == trust.current.pem
    assert renewal_reason(secret, s, trust, datetime.now(UTC))[0] is None


def test_istiod_renewal_reasons(tmp_path: Path) -> None:
    _, _, root = write_ca_dir(tmp_path / "ca")
    _, _, other_root = write_ca_dir(tmp_path / "other")
    trust = TrustBundle([root])
    s = spec()
    secret = _issue(tmp_path, s, tmp_path / "ca", trust)
    now = datetime.now(UTC)
    reason, next_check = renewal_reason(secret, s, trust, now)
    assert reason is None
    assert timedelta(minutes=29) < next_check - now <= timedelta(minutes=31)
    assert renewal_reason(None, s, trust, now)[0] == "missing"
    assert renewal_reason(secret, s, trust, now + timedelta(minutes=31))[0] == "due for renewal"
    assert renewal_reason(secret, spec(revisions=("default",)), trust, now)[0] == "names changed"
    assert renewal_reason(secret, s, TrustBundle([root, other_root]), now)[0] == "trust bundle changed"
    tampered = k8s.V1Secret(data={**(secret.data or {}), "tls.key": base64.b64encode(b"junk").decode()})
    assert (renewal_reason(tampered, s, trust, now)[0] or "").startswith("unreadable")


# --- runtime issuer --------------------------------------------------------------------------


def test_configmap_values_overlay_the_command_line() -> None:
    backend, values = issuer_values_from_configmap(
        {"local-ca-dir": "/ca2"},
        default_backend="local",
        default_values={"local-ca-dir": "/ca1", "local-ca-reload-interval": timedelta(seconds=3)},
    )
    assert backend == "local"
    assert values["local-ca-dir"] == "/ca2"
    assert values["local-ca-reload-interval"] == timedelta(seconds=3)
    _, values = issuer_values_from_configmap(
        {"issuer": "local", "local-ca-reload-interval": "1m"}, default_backend="vault", default_values={}
    )
    assert values["local-ca-reload-interval"] == timedelta(minutes=1)


def test_istio_csr_keys_select_cert_manager() -> None:
    backend, values = issuer_values_from_configmap(
        {"issuer-name": "cluster-ca", "issuer-kind": "ClusterIssuer", "issuer-group": "cert-manager.io"},
        default_backend="local",
        default_values={"local-ca-dir": "/ca1"},
    )
    assert backend == "cert-manager"
    assert values["certmanager-issuer-name"] == "cluster-ca"
    assert values["certmanager-issuer-kind"] == "ClusterIssuer"
    assert values["certmanager-issuer-group"] == "cert-manager.io"
    assert values["certmanager-serving-issuer-name"] == ""  # istio-csr's keys name the signing issuer
    assert "local-ca-dir" not in values


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"issuer": "nope"}, "unknown 'nope'"),
        ({"local-ca-dirr": "/x"}, "local-ca-dirr: not an option"),
        ({"local-ca-reload-interval": "soon"}, "local-ca-reload-interval"),
    ],
)
def test_bad_configmaps_are_refused(data: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        issuer_values_from_configmap(data, default_backend="local", default_values={})


def test_switch_and_rejection_keep_a_working_issuer(tmp_path: Path) -> None:
    _, _, root1 = write_ca_dir(tmp_path / "ca1")
    _, _, root2 = write_ca_dir(tmp_path / "ca2")
    write_ca_dir(tmp_path / "untrusted")
    static = local_issuer(tmp_path / "ca1")
    slot = IssuerSlot(static)
    trust = TrustBundle([root1, root2])
    renewals: list[int] = []
    ctl = RuntimeIssuerController(
        Runtime(worker_index=1),  # not worker 0: no Events
        slot,
        trust,
        ref=ObjectRef("ns", "cfg"),
        default_backend="local",
        default_values={"local-ca-dir": str(tmp_path / "ca1"), "local-ca-reload-interval": timedelta(0)},
        probe_dns_names=("csr-service.test",),
        grace=timedelta(0),
        on_change=lambda: renewals.append(1),
    )

    def apply(data: dict[str, str] | None) -> None:
        if data is None:
            ctl.on_event("DELETED", k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="cfg")))
        else:
            ctl.on_event("MODIFIED", k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="cfg"), data=data))

        async def go() -> None:
            await ctl.reconcile()
            await asyncio.sleep(0)  # let the close-later task run

        asyncio.run(go())

    def signing_root() -> x509.Certificate:
        material = slot.current.material  # type: ignore[attr-defined]
        return material.roots[0]  # type: ignore[no-any-return]

    apply({"local-ca-dir": str(tmp_path / "ca2")})
    assert signing_root() == root2
    assert renewals == [1]
    apply({"local-ca-dir": str(tmp_path / "missing")})
    apply({"local-ca-dir": str(tmp_path / "untrusted")})
    assert signing_root() == root2
    assert ctl.stats["rejected"] == 2
    apply({"local-ca-dir": str(tmp_path / "untrusted")})  # the same bad data is not retried
    assert ctl.stats["rejected"] == 2
    apply(None)
    assert slot.current is static
    assert ctl.stats["switched"] == 2


# --- wiring -----------------------------------------------------------------------------------


def _components(tmp_path: Path, **flags: Any) -> list[Any]:
    from csr_service.service.wiring import build_service

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
        ' "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:1"}}],'
        ' "users": [{"name": "u", "user": {"token": "t"}}],'
        ' "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}'
    )
    write_ca_dir(tmp_path / "ca")
    cfg = config(
        local_ca_dir=str(tmp_path / "ca"), jwt_jwks_file=str(tmp_path / "jwks"), kubeconfig=str(kubeconfig), **flags
    )
    from jwt.algorithms import ECAlgorithm

    jwk = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True)
    (tmp_path / "jwks").write_text(json.dumps({"keys": [jwk]}))
    return build_service(cfg).components


def test_only_what_is_switched_on_is_built(tmp_path: Path) -> None:
    from csr_service.controllers.leader import LeaderElector
    from csr_service.trust.sources import FileTrustSource

    assert _components(tmp_path) == []
    (tmp_path / "bundle.pem").write_text(certs_pem(write_ca_dir(tmp_path / "r")[2]))
    assert [type(c) for c in _components(tmp_path, root_ca_file=str(tmp_path / "bundle.pem"))] == [FileTrustSource]
    plain = _components(tmp_path, root_configmaps="true", istiod_cert="true")
    assert [type(c) for c in plain] == [RootConfigMapController, IstiodCertController]
    elected = _components(tmp_path, root_configmaps="true", istiod_cert="true", leader_election="true")
    assert [type(c) for c in elected] == [LeaderElector]
    assert not elected[0].all_workers
    assert [type(t) for t in elected[0].tasks] == [RootConfigMapController, IstiodCertController]
    runtime = _components(tmp_path, runtime_issuer_configmap="ns/cfg")
    assert [type(c) for c in runtime] == [RuntimeIssuerController]
    assert runtime[0].all_workers
