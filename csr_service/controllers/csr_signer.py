"""The Kubernetes CSR signer: csr-service signs istiod's ``certificates.k8s.io/v1`` CSRs.

With ``EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`` istiod authenticates a workload itself, creates a
CertificateSigningRequest (signerName ``K8S_SIGNER`` or ``CERT_SIGNER_DOMAIN/<CertSigner>``),
approves it at once, and waits up to 60 s for ``status.certificate``; it never looks at
conditions and deletes the CSR afterwards (``../shared/docs/ISTIOD_RA.md``). This controller is
that signer, for every issuer csr-service has:

1. watch every CSR (one list+watch, filtered here: a field selector cannot match signerName
   patterns), and act only on ours that are ``Approved`` and have neither ``Failed``/``Denied``
   nor a certificate — never approve anything;
2. check the requester (``spec.username`` in ``--k8s-signer-requesters``: anyone allowed to
   create CSRs may pick our signerName), then ``spec.request`` with the request pipeline's own
   CSR rules (:mod:`csr_service.pipeline.csr`): one SPIFFE URI of our trust domain; or, only on
   the signer names configured for it, istiod's own serving certificate (DNS names only, from an
   allowed set, no ``client auth``);
3. decide the lifetime (``spec.expirationSeconds`` clamped like the gRPC path; absent → default),
   sign with the signer name's issuer, verify the chain against that issuer's roots (the gRPC
   path's verifier), and write ``status.certificate`` = leaf + intermediates, never the root
   (istiod appends its own root: a root in the status would reach workloads twice);
4. refuse with a ``Failed`` condition (reason + message), never ``Denied`` (the apiserver refuses
   Denied after Approved) and never silence. An unavailable backend is retried while istiod may
   still be waiting (:data:`RETRY_WINDOW`), then it is ``Failed`` too.

Several replicas: the controller is leader-only work (``--leader-election``), so one replica
signs; the status write carries the resourceVersion it read, so in the moment two replicas
overlap (an old leader finishing a CSR while the new one starts) the second write gets 409 and
the CSR still ends with one certificate. Why not optimistic concurrency alone: every replica
would sign every CSR, doubling the work and, with Vault or cert-manager, issuing certificates
nobody receives. A new leader lists every CSR first, so CSRs created while no replica led (or
while the apiserver was down; the watch re-lists after 410 and reconnects after restarts) are
signed as soon as it leads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.common.errors import (
    AuthenticationError,
    CSRServiceError,
    DeadlineExceededError,
    InvalidRequestError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.common.lifecycle import BackgroundTask
from csr_service.controllers.settings import SignerIssuer, SignerSettings
from csr_service.infra import metrics
from csr_service.kube.util import EventRecorder, LoopInformer, Watch, WatchFactory, api_status
from csr_service.pipeline.csr import validate_dns_csr, validate_trust_domain_csr
from csr_service.pipeline.duration import decide_ttl
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pipeline.verify import ChainVerifier
from csr_service.plugins.issuer import IssuerAbilities, SigningRequest
from csr_service.plugins.registry import ISSUERS, find
from csr_service.plugins.runtime import Runtime
from csr_service.trust.bundle import TrustBundle
from csr_service.trust.sources import FileTrustSource

__all__ = ["CSRApi", "CSRSignerController", "KubeCSRApi", "Refusal", "SignerContext", "is_pending"]

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "certificates.k8s.io", "v1", "certificatesigningrequests"
#: istiod asks for exactly these (ISTIOD_RA.md §3); a CSR may ask for fewer.
WORKLOAD_USAGES = frozenset({"digital signature", "key encipherment", "server auth", "client auth"})
SERVING_USAGES = frozenset({"digital signature", "key encipherment", "server auth"})
_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "server auth", ExtendedKeyUsageOID.CLIENT_AUTH: "client auth"}
#: istiod gives up 60 s after creating the CSR; a transient issuer failure is retried until this
#: many seconds after we first saw the CSR approved, then the CSR gets Failed.
RETRY_WINDOW = 45.0
#: Kubernetes refuses expirationSeconds below 600; our own floor for what we issue.
MIN_EXPIRATION = 600
#: CSRs finished recently, so a late watch event for one does not sign it twice.
_DONE_MEMORY = 10_000


class Refusal(Exception):
    """A CSR we will not sign: becomes a ``Failed`` condition with ``reason`` and the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _true_conditions(obj: Mapping[str, Any]) -> set[str]:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return {str(c.get("type")) for c in conditions if str(c.get("status", "True")) == "True"}


def is_pending(obj: Mapping[str, Any]) -> bool:
    """Approved, and neither Denied, Failed nor signed: the only state in which we act."""
    if (obj.get("status") or {}).get("certificate"):
        return False
    types = _true_conditions(obj)
    return "Approved" in types and not types & {"Denied", "Failed"}


class CSRApi(Protocol):
    """The two calls the signer makes besides its watch (tests pass an in-memory one)."""

    async def update_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT ``…/certificatesigningrequests/<name>/status`` (409 on a stale resourceVersion)."""
        ...

    async def get(self, name: str) -> dict[str, Any] | None:
        """The CSR now, or None if it is gone."""
        ...


class KubeCSRApi:
    """:class:`CSRApi` on the apiserver: from the event loop (:mod:`csr_service.kube.rest`) when
    possible, else with the ``kubernetes`` client in a thread."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client

        from csr_service.kube.rest import for_client

        self._rest = for_client(api)
        self._custom = client.CustomObjectsApi(api)

    def list_fn(self) -> Any:
        """The list call of the CSR watch (dicts, not models)."""
        return functools.partial(self._custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)

    async def update_status(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._rest is not None:
            return await self._rest.call("PUT", f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}/status", body)
        custom: Any = self._custom
        result: dict[str, Any] = await asyncio.to_thread(
            custom.replace_cluster_custom_object_status, GROUP, VERSION, PLURAL, name, body
        )
        return result

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            if self._rest is not None:
                return await self._rest.call("GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}")
            custom: Any = self._custom
            result: dict[str, Any] = await asyncio.to_thread(
                custom.get_cluster_custom_object, GROUP, VERSION, PLURAL, name
            )
            return result
        except Exception as exc:
            if api_status(exc) == 404:
                return None
            raise

    async def aclose(self) -> None:
        if self._rest is not None:
            await self._rest.aclose()


@dataclass
class _Target:
    """What one signer name signs with."""

    issuer: IssuerAbilities
    trust: TrustBundle
    #: Created (and started, stopped) by this controller, not the service's --issuer.
    owned: bool
    #: The signer's own ``root-ca-file``, re-read when it changes (a mounted ConfigMap is
    #: updated in place), as ``--root-ca-file`` is for the service.
    source: FileTrustSource | None = None


@dataclass(frozen=True, slots=True)
class SignerContext:
    """The request pipeline's settings the signer applies too."""

    trust_domain: str
    max_duration: timedelta
    default_duration: timedelta


class CSRSignerController:
    """Component (leader-only with ``--leader-election``) signing our signer names' CSRs.

    ``on_event`` (the watch callback) and :meth:`process` (one CSR) are public so unit tests
    drive the controller with in-memory fakes (``api=``, ``watch=``).
    """

    name = "k8s-signer"
    all_workers = False

    def __init__(
        self,
        runtime: Runtime,
        settings: SignerSettings,
        context: SignerContext,
        *,
        slot: IssuerSlot,
        trust: TrustBundle,
        api: CSRApi | None = None,
        watch: WatchFactory | None = None,
        events: EventRecorder | None = None,
        root_file_interval: timedelta = timedelta(seconds=10),
    ) -> None:
        self._runtime = runtime
        self._s = settings
        #: How often a signer's ``root-ca-file`` is checked for changes (--root-ca-file's interval).
        self._root_file_interval = root_file_interval
        self._ctx = context
        self._slot = slot
        self._trust = trust
        self._api = api
        self._watch_factory = watch
        self._events = events
        self._verifier = ChainVerifier()
        self._targets: dict[str, _Target] = {}
        #: Issuers of configured signer names being started, and the ones that cannot start (why).
        self._builders: dict[str, BackgroundTask] = {}
        self._broken: dict[str, str] = {}
        self._watch: Watch | None = None
        #: name -> the latest version of a pending CSR, and when we first saw it approved.
        self._pending: dict[str, Mapping[str, Any]] = {}
        self._approved_at: dict[str, float] = {}
        self._queue: asyncio.Queue[str] | None = None
        self._queued: set[str] = set()
        self._done: dict[str, None] = {}  # uids, insertion-ordered (oldest dropped first)
        self._inflight: set[str] = set()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._owned_api = False
        self._startup = BackgroundTask("k8s-signer-start", self._start_watching, logger=log)
        self._workers = [
            BackgroundTask(f"k8s-signer-{i}", self._drain, every=float("inf"), first_delay=0, logger=log)
            for i in range(settings.workers)
        ]
        #: Counts for tests: signed, failed (Failed written), conflicts (409), retries.
        self.stats = {"signed": 0, "failed": 0, "conflicts": 0, "retries": 0, "gone": 0}

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        # Returns at once (the elector waits for start): issuers and the first list come in the task.
        self._queue = asyncio.Queue()
        self._queued.clear()
        self._pending.clear()
        self._approved_at.clear()
        self._startup.start()

    async def stop(self) -> None:
        await self._startup.stop()
        for worker in self._workers:
            await worker.stop()
        for handle in self._retry_handles:
            handle.cancel()
        self._retry_handles.clear()
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None
        for builder in self._builders.values():
            await builder.stop()
        self._builders.clear()
        self._broken.clear()
        for target in self._targets.values():
            if target.owned:
                await _close(target.issuer, target.source)
        self._targets.clear()
        if isinstance(self._api, KubeCSRApi) and self._owned_api:
            await self._api.aclose()
            self._api = None

    async def _start_watching(self) -> None:
        # Each configured signer name's issuer starts on its own: one backend down (Vault
        # sealed) must not hold up the signer names of the others; its CSRs are retried meanwhile.
        for signer, cfg in self._s.issuers.items():
            if signer not in self._targets and signer not in self._builders:
                builder = BackgroundTask(f"k8s-signer-issuer-{signer}", functools.partial(self._build, signer, cfg))
                self._builders[signer] = builder
                builder.start()
        if self._api is None:
            self._api = KubeCSRApi(self._runtime.kube())
            self._owned_api = True
        factory = self._watch_factory or LoopInformer
        list_fn: Any = self._api.list_fn() if isinstance(self._api, KubeCSRApi) else None
        for worker in self._workers:
            worker.start()
        self._watch = factory(list_fn, self.on_event, name="k8s-signer-csrs", list_kwargs={})
        await self._watch.start(sync_timeout=0)  # events flow as they come; nothing waits for the list
        log.info(
            "k8s signer: watching CertificateSigningRequests for %s (requesters %s)",
            ", ".join(self._s.names),
            ", ".join(sorted(self._s.requesters)),
        )

    async def _build(self, signer: str, cfg: SignerIssuer) -> None:
        """Create and start ``signer``'s issuer (retrying while its backend is unavailable) and
        its trust; a misconfiguration is remembered, and that signer's CSRs get Failed."""
        issuer: IssuerAbilities | None = None
        source: FileTrustSource | None = None
        try:
            issuer = IssuerAbilities.of(find(ISSUERS, cfg.backend).create(cfg.values, self._runtime))
            delay = 1.0
            while issuer.lifecycle is not None:
                try:
                    await issuer.lifecycle.start()
                    break
                except (UnavailableError, ResourceExhaustedError, DeadlineExceededError) as exc:
                    log.error(
                        "k8s signer: issuer of %s not usable yet (retrying in %.0fs): %s", signer, delay, exc.detail
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            if cfg.root_ca_file:
                trust = TrustBundle.from_file(cfg.root_ca_file)
                source = FileTrustSource(cfg.root_ca_file, trust, interval=self._root_file_interval)
                await source.start()
            elif issuer.roots is not None and issuer.roots_are_configuration:
                trust = TrustBundle(await issuer.roots.roots())
                if issuer.roots_watcher is not None:
                    issuer.roots_watcher.add_roots_listener(trust.update)
            else:
                trust = self._trust
        except asyncio.CancelledError:
            await _close(issuer, source)
            raise
        except Exception as exc:  # noqa: BLE001 (a broken issuer fails its own CSRs, not the signer)
            await _close(issuer, source)
            self._broken[signer] = str(exc)
            log.error("k8s signer: the issuer of %s cannot start; its CSRs get Failed: %s", signer, exc)
            return
        self._targets[signer] = _Target(issuer=issuer, trust=trust, owned=True, source=source)
        log.info("k8s signer: %s signs with issuer %s", signer, issuer.name)

    def _target(self, signer: str) -> _Target:
        target = self._targets.get(signer)
        if target is not None:
            return target
        if signer in self._s.issuers:
            broken = self._broken.get(signer)
            if broken is not None:
                raise Refusal("SigningFailed", f"the issuer configured for {signer} cannot start: {broken}")
            raise UnavailableError(
                "the signer's issuer is starting", detail=f"the issuer of {signer} is not started yet"
            )
        return _Target(issuer=self._slot.active, trust=self._trust, owned=False)

    # --- events and the queue ----------------------------------------------------------------
    def on_event(self, kind: str, obj: Any) -> None:
        """Queue CSRs of ours that became pending; forget deleted ones."""
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        if kind == "DELETED":
            self._pending.pop(name, None)
            self._approved_at.pop(name, None)
            return
        if not self._s.serves(str((obj.get("spec") or {}).get("signerName", ""))):
            return  # not ours: never touched
        if not is_pending(obj) or meta.get("uid") in self._done:
            self._pending.pop(name, None)
            return
        self._pending[name] = obj
        self._approved_at.setdefault(name, time.monotonic())
        self._enqueue(name)

    def _enqueue(self, name: str) -> None:
        if self._queue is None or name in self._queued or name in self._inflight:
            return
        self._queued.add(name)
        self._queue.put_nowait(name)
        for worker in self._workers:
            worker.wake()

    async def _drain(self) -> None:
        """A worker's round: sign queued CSRs until the queue is empty."""
        queue = self._queue
        while queue is not None:
            try:
                name = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            self._queued.discard(name)
            obj = self._pending.get(name)
            if obj is None:
                continue
            self._inflight.add(name)
            try:
                await self.process(obj)
            finally:
                self._inflight.discard(name)

    # --- one CSR -----------------------------------------------------------------------------
    async def process(self, obj: Mapping[str, Any]) -> str:
        """Sign or refuse one pending CSR; returns what happened (signed, failed, retry, conflict, gone)."""
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        signer = str((obj.get("spec") or {}).get("signerName", ""))
        seen = self._approved_at.setdefault(name, time.monotonic())
        try:
            certificate = await self._sign(obj)
        except Refusal as refusal:
            return await self._fail(obj, refusal.reason, str(refusal))
        except (UnavailableError, ResourceExhaustedError, DeadlineExceededError) as exc:
            waited = time.monotonic() - seen
            if waited < RETRY_WINDOW:
                delay = min(8.0, 0.5 * 2 ** min(int(waited), 4)) * (0.5 + random.random() / 2)  # noqa: S311
                self.stats["retries"] += 1
                log.warning(
                    "k8s signer: CSR %s (%s): issuer unavailable, retrying in %.1fs: %s",
                    name,
                    signer,
                    delay,
                    exc.detail,
                )
                self._retry_later(name, delay)
                return "retry"
            return await self._fail(obj, "IssuerUnavailable", f"the issuer was unavailable for {waited:.0f}s: {exc}")
        except CSRServiceError as exc:
            return await self._fail(obj, "SigningFailed", f"{exc.public} ({exc.detail})")
        result = await self._write(obj, {"certificate": base64.b64encode(certificate).decode("ascii")})
        if result == "written":
            self.stats["signed"] += 1
            took = time.monotonic() - seen
            metrics.observe_k8s_signer(signer, "signed", took)
            log.info("k8s signer: signed CSR %s (%s) in %.0f ms", name, signer, took * 1000)
            return "signed"
        return result

    def _retry_later(self, name: str, delay: float) -> None:
        loop = asyncio.get_running_loop()

        def again() -> None:
            self._retry_handles.discard(handle)
            if name in self._pending:
                self._enqueue(name)

        handle = loop.call_later(delay, again)
        self._retry_handles.add(handle)

    async def _sign(self, obj: Mapping[str, Any]) -> bytes:
        """The PEM of leaf + intermediates for ``obj``, or Refusal / an issuer error."""
        spec = obj.get("spec") or {}
        signer = str(spec.get("signerName", ""))
        username = str(spec.get("username", ""))
        if username not in self._s.requesters:
            raise Refusal(
                "RequesterNotAllowed",
                f"CSRs for {signer} are signed only for {', '.join(sorted(self._s.requesters))}; "
                f"this one was created by {username or 'nobody'}",
            )
        try:
            pem = base64.b64decode(str(spec.get("request", "")), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Refusal("InvalidRequest", "spec.request is not base64") from exc
        usages = tuple(str(u) for u in spec.get("usages") or ())
        expiration = spec.get("expirationSeconds")
        requested = int(expiration) if isinstance(expiration, int) and expiration > 0 else 0
        if expiration is not None and requested < MIN_EXPIRATION:
            raise Refusal("InvalidRequest", f"expirationSeconds {expiration} is below {MIN_EXPIRATION}")
        try:
            request, maximum, default = self._signing_request(signer, pem, usages, obj)
        except (InvalidRequestError, AuthenticationError) as exc:
            raise Refusal("InvalidRequest", exc.detail or exc.public) from exc
        target = self._target(signer)
        now = datetime.now(UTC)
        ca_not_after = target.issuer.signing_ca_not_after()
        ttl = decide_ttl(requested, default=default, maximum=maximum, now=now, ca_not_after=ca_not_after)
        if ttl <= timedelta(0):
            raise Refusal("SigningFailed", f"the signing CA expired at {ca_not_after}")
        request = _with_ttl(request, ttl)
        issued = await metrics.observe_sign(target.issuer.name, target.issuer.issuer.sign(request))
        # The gRPC path's verifier: key, names, lifetime, and a path to this signer's roots.
        leaf_pem, intermediates = self._verifier.verify(issued, request, target.trust.current, now=datetime.now(UTC))
        extra = _ekus(issued.leaf) - set(usages or WORKLOAD_USAGES)
        if extra:
            raise Refusal("SigningFailed", f"the issuer added key usages the CSR did not ask for: {', '.join(extra)}")
        return "".join([leaf_pem, *intermediates]).encode()

    def _signing_request(
        self, signer: str, pem: bytes, usages: tuple[str, ...], obj: Mapping[str, Any]
    ) -> tuple[SigningRequest, timedelta, timedelta]:
        """The issuer request for a workload or an istiod serving CSR, with its max and default TTL."""
        request_id = f"csr/{(obj.get('metadata') or {}).get('name', '')}"
        if usages and set(usages) <= SERVING_USAGES and "client auth" not in usages and _has_dns(pem):
            # istiod's own serving certificate (PILOT_CERT_PROVIDER=k8s.io/<signer>).
            if signer not in self._s.istiod_signer_names:
                raise Refusal(
                    "ServingCertificateNotAllowed",
                    f"{signer} does not sign istiod serving certificates (--k8s-signer-istiod-signer-names)",
                )
            parsed, dns = validate_dns_csr(pem, self._s.istiod_dns_names)
            request = SigningRequest(
                csr=parsed.csr,
                csr_pem=parsed.pem,
                ttl=self._s.istiod_max_duration,
                dns_names=dns,
                request_id=request_id,
                purpose="istiod",
                usages=usages,
                csr_public_key=parsed.public_key,
            )
            return request, self._s.istiod_max_duration, self._s.istiod_max_duration
        if not set(usages) <= WORKLOAD_USAGES:
            raise Refusal("InvalidRequest", f"usages {', '.join(sorted(set(usages) - WORKLOAD_USAGES))} not allowed")
        validated = validate_trust_domain_csr(pem, self._ctx.trust_domain)
        request = SigningRequest(
            csr=validated.csr,
            csr_pem=validated.pem,
            ttl=self._ctx.max_duration,
            uris=(validated.uri,),
            request_id=request_id,
            usages=usages,
            csr_public_key=validated.public_key,
        )
        return request, self._ctx.max_duration, self._ctx.default_duration

    # --- writing the outcome -------------------------------------------------------------------
    async def _fail(self, obj: Mapping[str, Any], reason: str, message: str) -> str:
        name = str((obj.get("metadata") or {}).get("name", ""))
        signer = str((obj.get("spec") or {}).get("signerName", ""))
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        condition = {
            "type": "Failed",
            "status": "True",
            "reason": reason,
            "message": message[:1000],
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
        conditions = [*((obj.get("status") or {}).get("conditions") or ()), condition]
        result = await self._write(obj, {"conditions": conditions})
        if result == "written":
            self.stats["failed"] += 1
            metrics.observe_k8s_signer(signer, "failed", None)
            log.warning("k8s signer: refused CSR %s (%s): %s: %s", name, signer, reason, message)
            self._event(obj, reason, message)
            return "failed"
        return result

    async def _write(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> str:
        """PUT the status with the resourceVersion we read: written, conflict, gone, or retry."""
        assert self._api is not None
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CertificateSigningRequest",
            "metadata": dict(meta),
            "spec": obj.get("spec") or {},
            "status": {**(obj.get("status") or {}), **status},
        }
        try:
            await self._api.update_status(name, body)
        except Exception as exc:  # noqa: BLE001 (classified by status below)
            code = api_status(exc)
            if code == 404:
                self.stats["gone"] += 1
                log.info("k8s signer: CSR %s is gone (istiod gave up or deleted it)", name)
                self._forget(obj)
                return "gone"
            if code == 409:
                # Changed since we read it: another replica wrote it, or istiod touched it.
                self.stats["conflicts"] += 1
                fresh = await self._api.get(name)
                if fresh is None or not is_pending(fresh):
                    log.info("k8s signer: CSR %s was completed elsewhere; leaving it", name)
                    self._forget(obj)
                    return "conflict"
                self._pending[name] = fresh
                self._retry_later(name, 0.0)  # after this attempt has left the in-flight set
                return "conflict"
            log.warning("k8s signer: cannot write the status of CSR %s (HTTP %s): %s; retrying", name, code, exc)
            self.stats["retries"] += 1
            self._retry_later(name, 1.0)
            return "retry"
        self._forget(obj)
        return "written"

    def _forget(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self._pending.pop(str(meta.get("name", "")), None)
        self._approved_at.pop(str(meta.get("name", "")), None)
        uid = meta.get("uid")
        if uid:
            self._done[str(uid)] = None
            if len(self._done) > _DONE_MEMORY:
                del self._done[next(iter(self._done))]

    def _event(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """A Warning Event on the CSR (cluster-scoped: the Event lives in ``default``)."""
        if self._events is None:
            if self._api is None or not isinstance(self._api, KubeCSRApi):
                return
            self._events = EventRecorder(self._runtime.kube())
        meta = obj.get("metadata") or {}
        self._events.record(
            kind="CertificateSigningRequest",
            namespace="default",
            name=str(meta.get("name", "")),
            uid=meta.get("uid"),
            reason=reason,
            message=message,
            warning=True,
            api_version=f"{GROUP}/{VERSION}",
            cluster_scoped=True,
        )


async def _close(issuer: IssuerAbilities | None, source: FileTrustSource | None = None) -> None:
    if source is not None:
        await source.stop()
    if issuer is not None and issuer.lifecycle is not None:
        try:
            await issuer.lifecycle.stop()
        except Exception:  # closing must not break stopping
            log.exception("k8s signer: closing issuer %s failed", issuer.name)


def _with_ttl(request: SigningRequest, ttl: timedelta) -> SigningRequest:
    return dataclasses.replace(request, ttl=ttl)


def _has_dns(pem: bytes) -> bool:
    """Whether the CSR asks for DNS names (decides which rules apply; the rules parse it properly)."""
    try:
        san = x509.load_pem_x509_csr(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except Exception:  # noqa: BLE001 (malformed: the workload rules will say why)
        return False
    return bool(san.value.get_values_for_type(x509.DNSName))


def _ekus(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return set()
    return {_EKU_NAMES.get(oid, oid.dotted_string) for oid in ext}
