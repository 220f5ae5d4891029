"""The Kubernetes CSR signer's logic, against in-memory fakes (the watch and the CSR API).

What istiod does with the outcome, and the same flows against a real apiserver and istiod, are in
tests/integration/istiod_signer/.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.cli import build_config
from csr_service.common.errors import ConfigError, UnavailableError
from csr_service.controllers.csr_signer import CSRSignerController, SignerContext, is_pending
from csr_service.controllers.settings import SignerSettings
from csr_service.kube.rest import KubeAPIError
from csr_service.pipeline.handler import IssuerSlot
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.plugins.runtime import Runtime
from csr_service.trust.bundle import TrustBundle
from issuers.local.issuer import DirectorySource, LocalCAIssuer
from tests.support import pki
from tests.support.certs import write_ca_dir
from tests.support.kube import FakeWatches

ISTIOD = "system:serviceaccount:istio-system:istiod"
SIGNER = "csr-service.test/workloads"
ISTIOD_SIGNER = "csr-service.test/istiod"
WORKLOAD_USAGES = ["digital signature", "key encipherment", "server auth", "client auth"]
SERVING_USAGES = ["digital signature", "key encipherment", "server auth"]
ME = "spiffe://cluster.local/ns/default/sa/reviews"


class FakeCSRApi:
    """CertificateSigningRequests in memory, with the apiserver's resourceVersion check on PUT."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, dict[str, Any]]] = []

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["metadata"]["name"]] = obj
        return obj

    async def update_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self.objects.get(name)
        if current is None:
            raise KubeAPIError(404, "NotFound", "")
        if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"]:
            raise KubeAPIError(409, "Conflict", "")
        fresh = {**current, "status": body["status"]}
        fresh["metadata"] = {
            **current["metadata"],
            "resourceVersion": str(int(current["metadata"]["resourceVersion"]) + 1),
        }
        self.objects[name] = fresh
        self.writes.append((name, body["status"]))
        return fresh

    async def get(self, name: str) -> dict[str, Any] | None:
        return self.objects.get(name)


def csr_object(
    name: str,
    *,
    uri: str = ME,
    dns: tuple[str, ...] = (),
    signer: str = SIGNER,
    user: str = ISTIOD,
    usages: list[str] | None = None,
    expiration: int | None = 3600,
    conditions: tuple[str, ...] = ("Approved",),
    key: str = "ec256",
) -> dict[str, Any]:
    pem = pki.csr_pem(pki.new_key(key), uris=(uri,) if uri else (), dns=dns)  # type: ignore[arg-type]
    spec: dict[str, Any] = {
        "signerName": signer,
        "request": base64.b64encode(pem).decode(),
        "usages": usages if usages is not None else WORKLOAD_USAGES,
        "username": user,
    }
    if expiration is not None:
        spec["expirationSeconds"] = expiration
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "1"},
        "spec": spec,
        "status": {"conditions": [{"type": t, "status": "True"} for t in conditions]},
    }


def settings(**over: Any) -> SignerSettings:
    values: dict[str, Any] = {
        "names": ("csr-service.test/*",),
        "requesters": frozenset({ISTIOD}),
        "issuers": {},
        "istiod_signer_names": frozenset({ISTIOD_SIGNER}),
        "istiod_dns_names": frozenset({"istiod.istio-system.svc", "istio-pilot.istio-system.svc"}),
        "istiod_max_duration": timedelta(days=30),
        "workers": 2,
    }
    values.update(over)
    return SignerSettings(**values)


class Kit:
    def __init__(self, controller: CSRSignerController, api: FakeCSRApi, root: x509.Certificate) -> None:
        self.controller, self.api, self.root = controller, api, root

    def certificates(self, name: str) -> list[x509.Certificate]:
        pem = base64.b64decode(self.api.objects[name]["status"]["certificate"])
        return pki.load_certs(pem)

    def failed(self, name: str) -> dict[str, Any] | None:
        conds = self.api.objects[name]["status"].get("conditions") or ()
        return next((c for c in conds if c["type"] == "Failed"), None)


def run(
    tmp_path: Path,
    body: Callable[[Kit], Awaitable[None]],
    *,
    issuer: Any = None,
    root_file_interval: timedelta = timedelta(seconds=10),
    **over: Any,
) -> None:
    _, _, root = write_ca_dir(tmp_path / "ca", intermediate=True)

    async def main() -> None:
        local = LocalCAIssuer(DirectorySource(str(tmp_path / "ca")), reload_interval=timedelta(0))
        await local.start()
        api = FakeCSRApi()
        controller = CSRSignerController(
            Runtime(),
            settings(**over),
            SignerContext(
                trust_domain="cluster.local", max_duration=timedelta(hours=1), default_duration=timedelta(minutes=30)
            ),
            slot=IssuerSlot(issuer or local),
            trust=TrustBundle(await local.roots()),
            api=api,
            watch=FakeWatches(),
            root_file_interval=root_file_interval,
        )
        await controller.start()
        try:
            await body(Kit(controller, api, root))
        finally:
            await controller.stop()
            await local.stop()

    asyncio.run(main())


def test_is_pending_only_when_approved_and_not_finished() -> None:
    assert is_pending(csr_object("a"))
    assert not is_pending(csr_object("a", conditions=()))
    assert not is_pending(csr_object("a", conditions=("Approved", "Failed")))
    assert not is_pending(csr_object("a", conditions=("Denied",)))
    signed = csr_object("a")
    signed["status"]["certificate"] = "Zm9v"
    assert not is_pending(signed)


@pytest.mark.parametrize("key", ["ec256", "rsa"])
def test_signs_leaf_and_intermediate_never_the_root(tmp_path: Path, key: str) -> None:
    async def body(kit: Kit) -> None:
        obj = kit.api.add(csr_object("w1", expiration=10 * 86400, key=key))
        assert await kit.controller.process(obj) == "signed"
        certs = kit.certificates("w1")
        assert len(certs) == 2  # leaf + intermediate
        assert kit.root not in certs
        pki.verify_chain(certs[0], certs[1:], [kit.root])
        assert pki.spiffe_uris(certs[0]) == [ME]
        life = certs[0].not_valid_after_utc - certs[0].not_valid_before_utc
        assert life <= timedelta(hours=1, minutes=2)  # 10 days asked, clamped (+ 2 min backdating)

    run(tmp_path, body)


def test_absent_expiration_gets_the_default(tmp_path: Path) -> None:
    async def body(kit: Kit) -> None:
        obj = kit.api.add(csr_object("w1", expiration=None))
        assert await kit.controller.process(obj) == "signed"
        leaf = kit.certificates("w1")[0]
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert timedelta(minutes=29) < life <= timedelta(minutes=32)

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("over", "reason", "fragment"),
    [
        ({"user": "system:serviceaccount:default:mallory"}, "RequesterNotAllowed", "mallory"),
        ({"uri": "spiffe://evil.example/ns/default/sa/reviews"}, "InvalidRequest", "evil.example"),
        ({"uri": "", "dns": ("istiod.istio-system.svc",)}, "InvalidRequest", "DNS"),
        ({"usages": [*WORKLOAD_USAGES, "code signing"]}, "InvalidRequest", "code signing"),
        ({"expiration": 300}, "InvalidRequest", "below 600"),
        (
            {"uri": "", "dns": ("istiod.istio-system.svc",), "usages": SERVING_USAGES},
            "ServingCertificateNotAllowed",
            "--k8s-signer-istiod-signer-names",
        ),
        (
            {"uri": "", "dns": ("evil.example.com",), "usages": SERVING_USAGES, "signer": ISTIOD_SIGNER},
            "InvalidRequest",
            "evil.example.com",
        ),
    ],
)
def test_refusals_are_failed_conditions(tmp_path: Path, over: dict[str, Any], reason: str, fragment: str) -> None:
    async def body(kit: Kit) -> None:
        obj = kit.api.add(csr_object("r1", **over))
        assert await kit.controller.process(obj) == "failed"
        failed = kit.failed("r1")
        assert failed is not None
        assert failed["reason"] == reason
        assert fragment in failed["message"]
        assert "certificate" not in kit.api.objects["r1"]["status"]
        conds = [c["type"] for c in kit.api.objects["r1"]["status"]["conditions"]]
        assert conds == ["Approved", "Failed"]  # the approval stays; never Denied

    run(tmp_path, body)


def test_istiod_serving_certificate_on_its_signer(tmp_path: Path) -> None:
    async def body(kit: Kit) -> None:
        dns = ("istiod.istio-system.svc", "istio-pilot.istio-system.svc")
        obj = kit.api.add(
            csr_object("i1", uri="", dns=dns, usages=SERVING_USAGES, signer=ISTIOD_SIGNER, expiration=315360000)
        )
        assert await kit.controller.process(obj) == "signed"
        leaf = kit.certificates("i1")[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(dns)
        eku = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert eku == [ExtendedKeyUsageOID.SERVER_AUTH]  # usages followed: no client auth
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(days=30, minutes=2)

    run(tmp_path, body)


def test_events_queue_only_pending_csrs_of_ours(tmp_path: Path) -> None:
    async def body(kit: Kit) -> None:
        ctl = kit.controller
        foreign = kit.api.add(csr_object("f1", signer="example.com/other"))
        unapproved = kit.api.add(csr_object("u1", conditions=()))
        denied = kit.api.add(csr_object("d1", conditions=("Denied",)))
        good = kit.api.add(csr_object("g1"))
        for obj in (foreign, unapproved, denied, good):
            ctl.on_event("ADDED", obj)
        for _ in range(200):
            if kit.api.writes:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert [name for name, _ in kit.api.writes] == ["g1"]
        # The watch then reports our own write: nothing more happens.
        ctl.on_event("MODIFIED", kit.api.objects["g1"])
        await asyncio.sleep(0.05)
        assert len(kit.api.writes) == 1

    run(tmp_path, body)


def test_conflict_with_a_finished_csr_writes_nothing(tmp_path: Path) -> None:
    """Another replica signed it first: our write gets 409, the fresh copy is signed: leave it."""

    async def body(kit: Kit) -> None:
        stale = kit.api.add(csr_object("c1"))
        done = {**stale, "metadata": {**stale["metadata"], "resourceVersion": "2"}}
        done["status"] = {**stale["status"], "certificate": "Zm9v"}
        kit.api.objects["c1"] = done
        assert await kit.controller.process(stale) == "conflict"
        assert kit.api.writes == []
        assert kit.api.objects["c1"]["status"]["certificate"] == "Zm9v"
        assert kit.controller.stats["conflicts"] == 1

    run(tmp_path, body)


def test_deleted_csr_is_gone(tmp_path: Path) -> None:
    async def body(kit: Kit) -> None:
        obj = csr_object("x1")  # istiod gave up and deleted it before we wrote
        assert await kit.controller.process(obj) == "gone"

    run(tmp_path, body)


class FlakyIssuer:
    """Unavailable for the first ``failures`` calls, then the local CA."""

    name = "flaky"

    def __init__(self, inner: LocalCAIssuer, failures: int) -> None:
        self.inner, self.failures, self.calls = inner, failures, 0

    async def sign(self, request: SigningRequest) -> IssuedChain:
        self.calls += 1
        if self.calls <= self.failures:
            raise UnavailableError("backend down", detail="test")
        return await self.inner.sign(request)


def test_unavailable_issuer_is_retried_then_signs(tmp_path: Path) -> None:
    _, _, _ = write_ca_dir(tmp_path / "ca2", intermediate=True)
    inner = LocalCAIssuer(DirectorySource(str(tmp_path / "ca2")), reload_interval=timedelta(0))
    flaky = FlakyIssuer(inner, failures=1)

    async def body(kit: Kit) -> None:
        await inner.start()
        try:
            obj = kit.api.add(csr_object("t1"))
            kit.controller.on_event("ADDED", obj)
            for _ in range(400):
                if kit.api.writes:
                    break
                await asyncio.sleep(0.01)
        finally:
            await inner.stop()
        assert [name for name, _ in kit.api.writes] == ["t1"]
        assert "certificate" in kit.api.objects["t1"]["status"]
        assert kit.controller.stats["retries"] == 1

    # The chain is the second CA's: the signer verifies against that trust, so give it that root.
    async def with_trust(kit: Kit) -> None:
        kit.controller._trust.update(pki.load_certs((tmp_path / "ca2" / "root-cert.pem").read_bytes()))
        await body(kit)

    run(tmp_path, with_trust, issuer=flaky)


def test_signer_names_and_issuers_file_are_validated(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    base = {"local-ca-dir": str(tmp_path / "ca"), "jwt-jwks-file": str(tmp_path / "jwks.json")}
    with pytest.raises(ConfigError, match=r"kubernetes\.io"):
        build_config({**base, "k8s-signer-names": "kubernetes.io/kube-apiserver-client"})
    with pytest.raises(ConfigError, match="k8s-signer-names"):
        build_config({**base, "grpc-listen": ""})
    issuers = tmp_path / "issuers.toml"
    issuers.write_text('["csr-service.test/team-a"]\nissuer = "local"\nno-such-option = "x"\n')
    with pytest.raises(ConfigError, match="no-such-option"):
        build_config(
            {
                **base,
                "k8s-signer-names": "csr-service.test/*",
                "k8s-signer-issuers-file": str(issuers),
                "grpc-listen": "",
            }
        )
    issuers.write_text('["csr-service.test/team-a"]\nlocal-ca-dir = "/elsewhere"\n')
    config = build_config(
        {**base, "k8s-signer-names": "csr-service.test/*", "k8s-signer-issuers-file": str(issuers), "grpc-listen": ""}
    )
    assert config.authenticator is None  # no gRPC: no authenticator needed
    assert config.server.workers == 1
    signer = config.controllers.signer if config.controllers else None
    assert signer is not None
    assert signer.serves("csr-service.test/anything")
    assert not signer.serves("csr-service.testing/x")
    assert signer.issuers["csr-service.test/team-a"].backend == "local"
    assert signer.issuers["csr-service.test/team-a"].values["local-ca-dir"] == "/elsewhere"
    assert "istiod.istio-system.svc" in signer.istiod_dns_names


def test_a_broken_signer_issuer_fails_its_csrs_only(tmp_path: Path) -> None:
    """One signer name's issuer cannot start: its CSRs get Failed; the others still sign."""
    from csr_service.controllers.settings import SignerIssuer

    broken = "csr-service.test/team-broken"
    issuers = {broken: SignerIssuer(backend="local", values={"local-ca-dir": str(tmp_path / "nowhere")})}

    async def body(kit: Kit) -> None:
        for _ in range(200):  # the issuer is started in the background
            if broken in kit.controller._broken:
                break
            await asyncio.sleep(0.01)
        bad = kit.api.add(csr_object("b1", signer=broken))
        good = kit.api.add(csr_object("g1"))
        assert await kit.controller.process(bad) == "failed"
        failed = kit.failed("b1")
        assert failed is not None
        assert failed["reason"] == "SigningFailed"
        assert "nowhere" in failed["message"]
        assert await kit.controller.process(good) == "signed"

    run(tmp_path, body, issuers=issuers)


def test_a_signers_root_ca_file_is_followed_without_restart(tmp_path: Path) -> None:
    """A signer's own ``root-ca-file`` is re-read when it changes: its chain check then uses the new roots."""
    from csr_service.controllers.settings import SignerIssuer

    team = "csr-service.test/team-b"
    write_ca_dir(tmp_path / "ca-b")
    other = write_ca_dir(tmp_path / "ca-other")[2]
    root_file = tmp_path / "team-b-root.pem"
    root_file.write_bytes((tmp_path / "ca-other" / "root-cert.pem").read_bytes())  # the wrong root first
    issuers = {
        team: SignerIssuer(
            backend="local", values={"local-ca-dir": str(tmp_path / "ca-b")}, root_ca_file=str(root_file)
        )
    }

    async def body(kit: Kit) -> None:
        for _ in range(1000):  # the issuer is started in the background (generous: loaded CI machines)
            if team in kit.controller._targets:
                break
            await asyncio.sleep(0.01)
        target = kit.controller._targets[team]
        assert target.trust.current.roots == (other,)
        # Its chain does not verify against the wrong root: the controller does not hand it out.
        assert await kit.controller.process(kit.api.add(csr_object("r1", signer=team))) != "signed"
        root_file.write_bytes((tmp_path / "ca-b" / "root-cert.pem").read_bytes())
        for _ in range(1000):
            if target.trust.current.roots != (other,):
                break
            await asyncio.sleep(0.01)
        assert await kit.controller.process(kit.api.add(csr_object("r2", signer=team))) == "signed"

    run(tmp_path, body, issuers=issuers, root_file_interval=timedelta(milliseconds=20))
