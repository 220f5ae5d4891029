"""The cert-manager issuer against an in-memory CertificateRequest API (no cluster).

``FakeRequests`` stands in for :class:`~issuers.certmanager.api.RequestsApi`: an
object store with resourceVersions, label selectors and *real* watch streams (the informer and
``kubernetes.watch`` run unchanged and read JSON event lines from it), plus a tiny "cert-manager"
that approves/denies/signs each new request according to ``behaviour``. The same issuer is
tested against the real cert-manager in ``tests/integration/certmanager``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from cryptography import x509
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from csr_service.common.errors import (
    ConfigError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidRequestError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.plugins.registry import ISSUERS, create_issuer, find, plugins
from csr_service.plugins.runtime import Runtime
from issuers.certmanager.api import api_error
from issuers.certmanager.issuer import (
    IDENTITIES_ANNOTATION,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    USAGES,
    CertManagerIssuer,
)
from issuers.certmanager.options import OPTIONS
from issuers.certmanager.settings import Settings
from issuers.certmanager.status import Phase, classify, timeout_error
from issuers.certmanager.sweeper import sweep
from issuers.certmanager.watch import Waiter
from tests.support import pki
from tests.support.certs import WORKLOAD, csr_pem
from tests.support.pki import certs_pem, new_key
from tests.support.waiting import wait_for_async

T = TypeVar("T")
NAMESPACE = "istio-system"


# ------------------------------------------------------------------------------ the fake
class _Stream:
    """A watch response: ``kubernetes.watch`` iterates ``stream()`` for JSON event lines."""

    status = 200

    def __init__(self, owner: FakeRequests, selector: dict[str, str]) -> None:
        self.owner = owner
        self.selector = selector
        self.lines: queue.Queue[bytes | BaseException | None] = queue.Queue()

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        while not self.owner.stopping.is_set():
            try:
                item = self.lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class FakeRequests:
    """In-memory CertificateRequests in one namespace, plus a scripted cert-manager."""

    def __init__(self, behaviour: str = "sign", *, intermediate: bool = False) -> None:
        self.namespace = NAMESPACE
        self.behaviour = behaviour
        self.objects: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.counter = 0
        self.lock = threading.RLock()
        self.streams: list[_Stream] = []
        self.stopping = threading.Event()
        self.calls: list[tuple[str, str]] = []
        self.denied_verbs: list[str] = []
        self.fail_create: BaseException | None = None
        #: How many list calls fail (503) before lists succeed: an apiserver that is down at start.
        self.failing_lists = 0
        #: Watches opened before the test's body ended (teardown opens more while stopping).
        self.watches_while_running = 0
        root = pki.make_ca("fake root")
        self.issuing = pki.make_ca("fake intermediate", parent=root, path_length=0) if intermediate else root
        self.root, self.ca = root.cert, self.issuing.cert

    # --- RequestsApi surface ------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.fail_create is not None:
            raise self.fail_create
        with self.lock:
            self.counter += 1
            obj = json.loads(json.dumps(body))
            meta = obj["metadata"]
            meta["name"] = f"{meta.pop('generateName')}{self.counter:05d}"
            meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._store("ADDED", obj)
            self.calls.append(("create", meta["name"]))
            created = json.loads(json.dumps(obj))
        if self.behaviour == "sign-at-once":  # the outcome is there before create returns
            self.approve(meta["name"])
            self.sign(meta["name"])
        elif self.behaviour != "none":
            threading.Thread(target=self._controller, args=(meta["name"],), daemon=True).start()
        return created

    def get(self, name: str) -> dict[str, Any]:
        with self.lock:
            self.calls.append(("get", name))
            if name not in self.objects:
                raise ApiException(status=404, reason="Not Found")
            return json.loads(json.dumps(self.objects[name]))

    def delete(self, name: str) -> None:
        with self.lock:
            self.calls.append(("delete", name))
            obj = self.objects.pop(name, None)
            if obj is None:
                raise ApiException(status=404, reason="Not Found")
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._emit("DELETED", obj)

    def list_fn(self, **kw: Any) -> Any:
        selector = dict(p.split("=", 1) for p in (kw.get("label_selector") or "").split(",") if p)
        with self.lock:
            if kw.get("watch"):
                self.calls.append(("watch", ""))
                stream = _Stream(self, selector)
                self.streams.append(stream)
                return stream
            self.calls.append(("list", ""))
            if self.failing_lists > 0:
                self.failing_lists -= 1
                raise ApiException(status=503, reason="Service Unavailable")
            items = [json.loads(json.dumps(o)) for o in self.objects.values() if self._matches(o, selector)]
            return {"items": items, "metadata": {"resourceVersion": str(self.rv)}}

    def missing_verbs(self, verbs: tuple[str, ...]) -> list[str]:
        return [v for v in verbs if v in self.denied_verbs]

    # The blocking calls in a thread: RequestsApi's own path when its event-loop client is off.
    event_loop_calls = False

    async def acreate(self, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.create, body)

    async def adelete(self, name: str) -> None:
        await asyncio.to_thread(self.delete, name)

    async def aclose(self) -> None:
        pass

    # --- the scripted cert-manager ----------------------------------------------------
    def _controller(self, name: str) -> None:
        time.sleep(0.01)
        b = self.behaviour
        if b == "deny":
            self.set_condition(name, "Denied", "True", "policy.cert-manager.io", "no policy matched")
            self.set_condition(
                name, "Ready", "False", "Denied", "The CertificateRequest was denied by an approval controller"
            )
        elif b == "invalid":
            self.set_condition(name, "InvalidRequest", "True", "BadConfig", "bad usages")
        elif b == "fail":
            self.approve(name)
            self.set_condition(name, "Ready", "False", "Failed", "secret testbed-ca not found")
        elif b == "issuer-not-ready":
            self.approve(name)
            self.set_condition(
                name, "Ready", "False", "Pending", "Referenced issuer does not have a Ready status condition"
            )
        elif b == "approve-only":
            self.approve(name)
        elif b == "sign":
            self.approve(name)
            self.sign(name)

    def approve(self, name: str, *, silently: bool = False) -> None:
        self.set_condition(name, "Approved", "True", "cert-manager.io", "approved", silently=silently)

    def sign(self, name: str, *, silently: bool = False, certificate: str | None = None) -> None:
        with self.lock:
            obj = self.objects[name]
            csr = x509.load_pem_x509_csr(base64.b64decode(obj["spec"]["request"]))
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            seconds = int(obj["spec"]["duration"].rstrip("s"))
            now = datetime.now(UTC)
            leaf = pki.sign_leaf(
                self.issuing,
                csr.public_key(),  # type: ignore[arg-type]
                uris=san.get_values_for_type(x509.UniformResourceIdentifier),
                dns=san.get_values_for_type(x509.DNSName),
                not_before=now,
                not_after=now + timedelta(seconds=seconds),
            )
            pem = certs_pem(leaf) + (certs_pem(self.ca) if self.ca is not self.root else "")
            status = obj.setdefault("status", {})
            status["certificate"] = certificate or base64.b64encode(pem.encode()).decode()
            status["ca"] = base64.b64encode(certs_pem(self.root).encode()).decode()
        self.set_condition(
            name, "Ready", "True", "Issued", "Certificate fetched from issuer successfully", silently=silently
        )

    def set_condition(
        self, name: str, ctype: str, status: str, reason: str, message: str, *, silently: bool = False
    ) -> None:
        with self.lock:
            obj = self.objects.get(name)
            if obj is None:
                return
            conds = [c for c in obj.setdefault("status", {}).get("conditions", []) if c["type"] != ctype]
            conds.append({"type": ctype, "status": status, "reason": reason, "message": message})
            obj["status"]["conditions"] = conds
            if silently:  # changed while no watch was open: only a GET will see it
                self.rv += 1
                obj["metadata"]["resourceVersion"] = str(self.rv)
            else:
                self._store("MODIFIED", obj)

    def drop_watches(self) -> None:
        """Break every open watch like a dropped connection."""
        with self.lock:
            streams, self.streams = self.streams, []
        for s in streams:
            s.lines.put(ProtocolError("connection reset by peer"))

    # --- internals ----------------------------------------------------------------------
    @staticmethod
    def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in selector.items())

    def _store(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[obj["metadata"]["name"]] = obj
        self._emit(kind, obj)

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        line = (json.dumps({"type": kind, "object": obj}) + "\n").encode()
        for s in self.streams:
            if self._matches(obj, s.selector):
                s.lines.put(line)

    def ours(self) -> list[str]:
        with self.lock:
            return sorted(self.objects)


# ------------------------------------------------------------------------------ helpers
def values(**overrides: Any) -> dict[str, Any]:
    v: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    v["certmanager-timeout"] = timedelta(seconds=3)
    v.update({k.replace("_", "-"): val for k, val in overrides.items()})
    return v


def settings(**overrides: Any) -> Settings:
    return Settings.from_values(values(**overrides))


def request(uri: str = WORKLOAD, **kw: Any) -> SigningRequest:
    pem = csr_pem(new_key(), uris=(uri,) if uri else ())
    kw.setdefault("ttl", timedelta(minutes=30))
    return SigningRequest(csr=x509.load_pem_x509_csr(pem), csr_pem=pem, uris=(uri,) if uri else (), **kw)


def make(fake: FakeRequests, **overrides: Any) -> CertManagerIssuer:
    return CertManagerIssuer(None, settings(**overrides), api=fake, run_sweeper=False, instance="test")  # type: ignore[arg-type]


def run(fake: FakeRequests, issuer: CertManagerIssuer, body: Callable[[CertManagerIssuer], Awaitable[T]]) -> T:
    async def main() -> T:
        await issuer.start()
        try:
            return await body(issuer)
        finally:
            fake.watches_while_running = [op for op, _ in fake.calls].count("watch")
            fake.stopping.set()
            await issuer.stop()

    return asyncio.run(main())


# ------------------------------------------------------------------------------ settings
def test_registered_with_light_options_module() -> None:
    assert "cert-manager" in plugins(ISSUERS)
    names = {o.name for o in find(ISSUERS, "cert-manager").options}
    assert {
        "certmanager-namespace",
        "certmanager-issuer-name",
        "certmanager-issuer-kind",
        "certmanager-issuer-group",
        "preserve-certificate-requests",
        "certmanager-additional-annotations",
        "certmanager-timeout",
        "certmanager-sweep-age",
        "certmanager-sweep-interval",
        "certmanager-trust-status-ca",
    } <= names


def test_defaults_match_istio_csr() -> None:
    s = settings()
    assert (s.namespace, s.issuer_name, s.issuer_kind, s.issuer_group) == (
        "istio-system",
        "istio-ca",
        "Issuer",
        "cert-manager.io",
    )
    assert not s.preserve
    assert not s.trust_status_ca
    assert s.sweeping


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"certmanager-namespace": "Not_A_Namespace"}, "--certmanager-namespace"),
        ({"certmanager-issuer-name": ""}, "--certmanager-issuer-name"),
        ({"certmanager-issuer-kind": "cluster issuer"}, "--certmanager-issuer-kind"),
        ({"certmanager-issuer-group": "Not A Group"}, "--certmanager-issuer-group"),
        ({"certmanager-additional-annotations": ("novalue",)}, "--certmanager-additional-annotations"),
        ({"certmanager-additional-annotations": ("bad key!=x",)}, "--certmanager-additional-annotations"),
        ({"certmanager-timeout": timedelta(0)}, "--certmanager-timeout"),
        ({"certmanager-sweep-age": timedelta(seconds=5)}, "--certmanager-sweep-age"),
        ({"certmanager-sweep-interval": timedelta(0)}, "--certmanager-sweep-interval"),
        ({"certmanager-serving-issuer-name": "Bad Name"}, "--certmanager-serving-issuer-name"),
        (
            {"certmanager-serving-issuer-name": "serving", "certmanager-serving-issuer-kind": "a kind"},
            "--certmanager-serving-issuer-kind",
        ),
        ({"certmanager-serving-issuer-kind": "ClusterIssuer"}, "--certmanager-serving-issuer-kind"),
    ],
)
def test_invalid_settings_name_the_flag(overrides: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        Settings.from_values(values(**overrides))


def test_sweeper_off_when_preserving_or_age_zero() -> None:
    assert not settings(preserve_certificate_requests=True).sweeping
    assert not settings(certmanager_sweep_age=timedelta(0)).sweeping


def test_create_needs_a_kubernetes_client() -> None:
    with pytest.raises(ConfigError, match="--kubeconfig"):
        create_issuer("cert-manager", values(), Runtime(trust_domain="cluster.local"))


# ------------------------------------------------------------------------------ the request body
def test_request_body() -> None:
    issuer = make(
        FakeRequests(),
        certmanager_issuer_kind="ClusterIssuer",
        certmanager_issuer_name="mesh-ca",
        certmanager_issuer_group="awspca.cert-manager.io",
        certmanager_additional_annotations=("team=mesh", "example.com/owner=platform"),
    )
    req = request(ttl=timedelta(minutes=45), request_id="rid-1")
    body = issuer.request_body(req)
    meta, spec = body["metadata"], body["spec"]
    assert meta["generateName"] == "csr-service-"
    assert meta["namespace"] == NAMESPACE
    assert meta["labels"] == {MANAGED_BY_LABEL: "csr-service", INSTANCE_LABEL: "test"}
    assert meta["annotations"][IDENTITIES_ANNOTATION] == WORKLOAD
    assert meta["annotations"]["team"] == "mesh"
    assert meta["annotations"]["example.com/owner"] == "platform"
    assert meta["annotations"]["csr-service.io/request-id"] == "rid-1"
    assert base64.b64decode(spec["request"]) == req.csr_pem
    assert spec["isCA"] is False
    assert spec["duration"] == "2700s"
    assert spec["usages"] == list(USAGES) == ["digital signature", "key encipherment", "server auth", "client auth"]
    assert spec["issuerRef"] == {"name": "mesh-ca", "kind": "ClusterIssuer", "group": "awspca.cert-manager.io"}


def test_additional_annotations_cannot_override_ours() -> None:
    issuer = make(FakeRequests(), certmanager_additional_annotations=(f"{IDENTITIES_ANNOTATION}=spoofed",))
    assert issuer.request_body(request())["metadata"]["annotations"][IDENTITIES_ANNOTATION] == WORKLOAD


def test_serving_request_names_dns_and_ips_as_identities() -> None:
    pem = csr_pem(new_key(), uris=(), dns_names=("csr.example",))
    req = SigningRequest(
        csr=x509.load_pem_x509_csr(pem),
        csr_pem=pem,
        ttl=timedelta(hours=1),
        dns_names=("csr.example",),
        ip_addresses=("10.0.0.1",),
        purpose="serving",
    )
    ann = make(FakeRequests()).request_body(req)["metadata"]["annotations"]
    assert ann[IDENTITIES_ANNOTATION] == "csr.example,10.0.0.1"
    assert ann["csr-service.io/purpose"] == "serving"


# ------------------------------------------------------------------------------ status
def _cr(*conds: tuple[str, str, str, str], certificate: str = "", rv: str = "7") -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conds]
    }
    if certificate:
        status["certificate"] = certificate
    return {"metadata": {"name": "x", "resourceVersion": rv}, "status": status}


@pytest.mark.parametrize(
    ("obj", "phase"),
    [
        (_cr(), Phase.WAITING_FOR_APPROVAL),
        (_cr(("Approved", "True", "a", "b")), Phase.WAITING_FOR_ISSUER),
        (_cr(("Approved", "True", "a", "b"), ("Ready", "False", "Pending", "x")), Phase.WAITING_FOR_ISSUER),
        (_cr(("Denied", "True", "policy", "no")), Phase.DENIED),
        (_cr(("Ready", "False", "Denied", "denied")), Phase.DENIED),
        (_cr(("InvalidRequest", "True", "bad", "usages")), Phase.INVALID),
        (_cr(("Approved", "True", "a", "b"), ("Ready", "False", "Failed", "boom")), Phase.FAILED),
        (_cr(("Ready", "True", "Issued", ""), certificate=base64.b64encode(b"PEM").decode()), Phase.ISSUED),
    ],
)
def test_classify(obj: dict[str, Any], phase: Phase) -> None:
    assert classify(obj).phase is phase


def test_only_the_outcome_wakes_the_event_loop() -> None:
    """Events are classified on the informer's thread; the loop is woken once, for the outcome."""
    issued = base64.b64encode(b"PEM").decode()
    events = [
        _cr(rv="1"),
        _cr(("Approved", "True", "a", "b"), rv="2"),
        _cr(("Approved", "True", "a", "b"), rv="1"),  # an older version (a late re-GET): ignored
        _cr(("Approved", "True", "a", "b"), ("Ready", "True", "Issued", ""), certificate=issued, rv="3"),
        None,  # deleted after the outcome: nothing more
    ]

    async def main() -> tuple[Phase, list[Phase], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        seen: list[Phase] = []

        class CountingLoop:
            def create_future(self) -> asyncio.Future[Any]:
                return loop.create_future()

            def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Any:
                nonlocal wakeups
                wakeups += 1
                return loop.call_soon_threadsafe(callback, *args)

        waiter = Waiter("x", CountingLoop())  # type: ignore[arg-type]

        def informer() -> None:
            for obj in events:
                waiter.offer_threadsafe(obj)
                assert waiter.state is not None
                seen.append(waiter.state.phase)

        await asyncio.to_thread(informer)
        state = await waiter.done
        return state.phase, seen, wakeups

    phase, seen, wakeups = asyncio.run(main())
    assert phase is Phase.ISSUED
    assert seen == [Phase.WAITING_FOR_APPROVAL, *[Phase.WAITING_FOR_ISSUER] * 2, Phase.ISSUED, Phase.ISSUED]
    assert wakeups == 1


def test_unreadable_certificate_is_internal() -> None:
    with pytest.raises(InternalError):
        classify(_cr(certificate="not base64!"))


def test_timeout_errors_say_which_step_stalled() -> None:
    kw: dict[str, Any] = {"name": "ns/x", "issuer": "Issuer ns/ca", "waited": 8.0}
    approval = timeout_error(classify(_cr()), **kw)
    assert isinstance(approval, DeadlineExceededError)
    assert "not approved" in approval.public
    assert "waiting for approval" in approval.detail
    slow = timeout_error(classify(_cr(("Approved", "True", "a", "b"))), **kw)
    assert isinstance(slow, DeadlineExceededError)
    assert "did not sign in time" in slow.public
    assert "waiting for the issuer" in slow.detail
    not_ready = timeout_error(
        classify(
            _cr(
                ("Approved", "True", "a", "b"),
                ("Ready", "False", "Pending", "Referenced issuer does not have a Ready status condition"),
            )
        ),
        **kw,
    )
    assert isinstance(not_ready, FailedPreconditionError)
    assert "not ready" in not_ready.public
    assert "does not have a Ready status condition" in not_ready.detail


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (403, FailedPreconditionError),
        (404, FailedPreconditionError),
        (422, FailedPreconditionError),
        (429, ResourceExhaustedError),
        (500, UnavailableError),
        (503, UnavailableError),
    ],
)
def test_api_errors(status: int, error: type) -> None:
    err = api_error(ApiException(status=status, reason="x"), verb="create", namespace="istio-system")
    assert type(err) is error
    if status == 403:
        assert "grant verb 'create' on certificaterequests.cert-manager.io in namespace istio-system" in err.public


def test_connection_errors_are_unavailable() -> None:
    err = api_error(ProtocolError("reset"), verb="create", namespace="ns")
    assert isinstance(err, UnavailableError)


# ------------------------------------------------------------------------------ signing
@pytest.mark.parametrize("intermediate", [False, True])
def test_signs_and_deletes_the_request(intermediate: bool) -> None:
    fake = FakeRequests(intermediate=intermediate)
    req = request()
    issued: IssuedChain = run(fake, make(fake), lambda i: i.sign(req))
    assert issued.leaf.public_key() == req.csr.public_key()
    assert issued.chain[0].subject == issued.leaf.issuer
    assert issued.chain[-1] == fake.root  # status.ca completed the path (the pipeline drops roots)
    assert fake.ours() == []
    ops = [op for op, _ in fake.calls]
    # Per CSR: create + delete; no per-request watch, no GET.
    assert ops.count("create") == 1
    assert ops.count("delete") == 1
    assert "get" not in ops
    assert fake.watches_while_running == 1


def test_one_watch_serves_many_concurrent_requests() -> None:
    fake = FakeRequests()

    async def body(issuer: CertManagerIssuer) -> list[IssuedChain]:
        return list(await asyncio.gather(*(issuer.sign(request()) for _ in range(50))))

    results = run(fake, make(fake), body)
    assert len({r.leaf.serial_number for r in results}) == 50
    assert fake.watches_while_running == 1


def test_outcome_before_registration_is_not_lost() -> None:
    fake = FakeRequests("sign-at-once")
    issued: IssuedChain = run(fake, make(fake), lambda i: i.sign(request()))
    assert issued.leaf is not None


def test_preserve_keeps_the_request() -> None:
    fake = FakeRequests()
    run(fake, make(fake, preserve_certificate_requests=True), lambda i: i.sign(request()))
    assert len(fake.ours()) == 1


@pytest.mark.parametrize(
    ("behaviour", "error", "public"),
    [
        ("deny", PermissionDeniedError, "denied"),
        ("invalid", InvalidRequestError, "invalid"),
        ("fail", FailedPreconditionError, "failed to sign"),
    ],
)
def test_terminal_failures(behaviour: str, error: type, public: str) -> None:
    fake = FakeRequests(behaviour)
    with pytest.raises(error) as info:
        run(fake, make(fake), lambda i: i.sign(request()))
    assert public in info.value.public  # type: ignore[attr-defined]
    assert fake.ours() == [], "failed requests are deleted too"


def test_not_approved_in_time(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRequests("none")
    caplog.set_level(logging.WARNING, "issuers.certmanager")
    with pytest.raises(DeadlineExceededError) as info:
        run(fake, make(fake, certmanager_timeout=timedelta(seconds=0.3)), lambda i: i.sign(request()))
    assert "not approved in time" in info.value.public
    assert "waiting for approval" in caplog.text
    assert fake.ours() == []


def test_approved_but_not_signed_in_time(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRequests("approve-only")
    caplog.set_level(logging.WARNING, "issuers.certmanager")
    with pytest.raises(DeadlineExceededError) as info:
        run(fake, make(fake, certmanager_timeout=timedelta(seconds=0.3)), lambda i: i.sign(request()))
    assert "did not sign in time" in info.value.public
    assert "waiting for the issuer" in caplog.text


def test_issuer_not_ready() -> None:
    fake = FakeRequests("issuer-not-ready")
    with pytest.raises(FailedPreconditionError) as info:
        run(fake, make(fake, certmanager_timeout=timedelta(seconds=0.3)), lambda i: i.sign(request()))
    assert "Issuer istio-system/istio-ca is not ready" in info.value.public
    assert "does not have a Ready status condition" in info.value.detail


def test_deleted_while_waiting_is_unavailable() -> None:
    fake = FakeRequests("none")

    async def body(issuer: CertManagerIssuer) -> IssuedChain:
        task = asyncio.create_task(issuer.sign(request()))
        await wait_for_async(fake.ours, timeout=5, what="the CertificateRequest")
        fake.delete(fake.ours()[0])
        return await task

    with pytest.raises(UnavailableError, match="deleted"):
        run(fake, make(fake), body)


def test_watch_restart_rereads_waiting_requests() -> None:
    """An outcome written while the watch was down is found by the re-GET after it restarts."""
    fake = FakeRequests("none")

    async def body(issuer: CertManagerIssuer) -> IssuedChain:
        task = asyncio.create_task(issuer.sign(request()))
        name = (await wait_for_async(fake.ours, timeout=5, what="the CertificateRequest"))[0]
        await wait_for_async(lambda: issuer.watch.waiting, timeout=5, what="the watch to wait for it")
        fake.drop_watches()
        fake.approve(name, silently=True)
        fake.sign(name, silently=True)  # no event: only a GET sees it
        return await task

    issued = run(fake, make(fake, certmanager_timeout=timedelta(seconds=10)), body)
    assert issued.leaf is not None
    assert any(op == "get" for op, _ in fake.calls)
    assert fake.watches_while_running >= 2


def test_csr_names_must_be_the_requested_ones() -> None:
    fake = FakeRequests()
    pem = csr_pem(new_key(), uris=(WORKLOAD,))
    req = SigningRequest(
        csr=x509.load_pem_x509_csr(pem), csr_pem=pem, ttl=timedelta(hours=1), uris=(WORKLOAD + "-other",)
    )
    with pytest.raises(InternalError):
        run(fake, make(fake), lambda i: i.sign(req))
    assert fake.ours() == []
    assert not any(op == "create" for op, _ in fake.calls)


def test_request_created_after_the_caller_gave_up_is_deleted() -> None:
    """A server deadline cancels sign() while the create is in flight: what it creates is removed."""
    fake = FakeRequests("none")
    slow_create = fake.create

    def create(body: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.3)
        return slow_create(body)

    fake.create = create  # type: ignore[method-assign]

    async def body(issuer: CertManagerIssuer) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await issuer.sign(request())
        await wait_for_async(lambda: ("delete", "csr-service-00001") in fake.calls, timeout=5, what="the late delete")

    run(fake, make(fake), body)
    assert fake.ours() == []


def test_create_errors_are_classified() -> None:
    fake = FakeRequests()
    fake.fail_create = ApiException(status=403, reason="Forbidden")
    with pytest.raises(FailedPreconditionError) as info:
        run(fake, make(fake), lambda i: i.sign(request()))
    assert "grant verb 'create'" in info.value.public


def test_start_refuses_missing_rbac() -> None:
    fake = FakeRequests()
    fake.denied_verbs = ["watch", "delete"]
    with pytest.raises(FailedPreconditionError, match="watch, delete"):
        run(fake, make(fake), lambda i: i.sign(request()))


def test_start_is_retryable_while_the_apiserver_is_down() -> None:
    fake = FakeRequests()
    fake.failing_lists = 2
    issuer = make(fake)
    issuer.sync_timeout = 0.05

    async def main() -> IssuedChain:
        with pytest.raises(UnavailableError):
            await issuer.start()
        issuer.sync_timeout = 10
        await issuer.start()  # what the service's retry loop does
        try:
            return await issuer.sign(request())
        finally:
            fake.stopping.set()
            await issuer.stop()

    assert asyncio.run(main()).leaf is not None


def test_sign_before_start_is_unavailable() -> None:
    with pytest.raises(UnavailableError):
        asyncio.run(make(FakeRequests()).sign(request()))


def test_status_ca_is_trusted_only_when_configured(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRequests()

    async def body(issuer: CertManagerIssuer) -> list[x509.Certificate]:
        await issuer.sign(request())
        return list(await issuer.roots())

    assert run(fake, make(fake), body) == []
    fake2 = FakeRequests()
    caplog.set_level(logging.WARNING, "issuers.certmanager")
    assert run(fake2, make(fake2, certmanager_trust_status_ca=True), body) == [fake2.root]
    assert "trust on first use" in caplog.text


def test_health() -> None:
    fake = FakeRequests()
    issuer = make(fake)
    assert issuer.health()[0] is False

    async def body(i: CertManagerIssuer) -> tuple[bool, str]:
        return i.health()

    assert run(fake, issuer, body)[0] is True


# ------------------------------------------------------------------------------ sweeper
def test_sweeper_deletes_only_old_requests_of_ours() -> None:
    fake = FakeRequests("none")
    now = datetime.now(UTC)
    for name, age, managed in [("old", 3600, True), ("young", 10, True), ("foreign", 3600, False)]:
        stamp = (now - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        labels = {MANAGED_BY_LABEL: "csr-service"} if managed else {}
        fake.objects[name] = {"metadata": {"name": name, "creationTimestamp": stamp, "labels": labels}}
    deleted = sweep(
        fake.list_fn, fake.delete, label_selector=f"{MANAGED_BY_LABEL}=csr-service", max_age=timedelta(minutes=15)
    )
    assert deleted == 1
    assert fake.ours() == ["foreign", "young"]


def _serving_request() -> SigningRequest:
    pem = csr_pem(new_key(), uris=(), dns_names=("csr.example",))
    return SigningRequest(
        csr=x509.load_pem_x509_csr(pem),
        csr_pem=pem,
        ttl=timedelta(hours=1),
        dns_names=("csr.example",),
        purpose="serving",
    )


def test_own_certificates_may_have_their_own_issuer() -> None:
    """A workload issuer that allows SPIFFE URIs only (a Vault role behind cert-manager) cannot
    sign the serving certificate's DNS names: --certmanager-serving-issuer-* names another."""
    issuer = make(
        FakeRequests(),
        certmanager_issuer_kind="ClusterIssuer",
        certmanager_issuer_name="vault-workloads",
        certmanager_serving_issuer_name="vault-serving",
    )
    assert issuer.request_body(request())["spec"]["issuerRef"]["name"] == "vault-workloads"
    for purpose in ("serving", "istiod"):
        req = replace(_serving_request(), purpose=purpose)
        ref = issuer.request_body(req)["spec"]["issuerRef"]
        assert ref == {"name": "vault-serving", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert issuer.settings.describe_issuer("serving") == "ClusterIssuer vault-serving"
    # Without it, everything goes to the one issuer, as before.
    assert make(FakeRequests()).request_body(_serving_request())["spec"]["issuerRef"]["name"] == "istio-ca"
