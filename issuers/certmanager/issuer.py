"""The cert-manager issuer: one CertificateRequest per CSR, waited for on one shared watch.

Per CSR: ``create`` (generateName ``csr-service-``, our labels, the identities annotation that
approver-policy rules can match, usages like Istio's own CA) → wait on the process-wide watch
(:mod:`.watch`) until the request is issued, denied, invalid, failed or deleted, or
``--certmanager-timeout`` passes → ``delete`` (unless ``--preserve-certificate-requests``). Two
API calls per CSR, made from the event loop under the shared QPS/burst limit (:mod:`.api`);
istio-csr makes four (create, watch, get, delete) behind client-go's QPS 5.

Trust: ``status.certificate`` gives the leaf and its intermediates. ``status.ca`` is best
effort and may be an intermediate (istio-csr #155, #107), so it is only ever a *candidate*
for completing the path; the pipeline verifies every chain against ``--root-ca-file``. Only
with ``--certmanager-trust-status-ca`` do its self-signed certificates count as roots
(:meth:`CertManagerIssuer.roots`), and that is logged as a warning.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509

from csr_service.common.errors import (
    CSRServiceError,
    FailedPreconditionError,
    InternalError,
    UnavailableError,
)
from csr_service.common.lifecycle import BackgroundTask
from csr_service.kube.rest import KubeAPIError
from csr_service.pki.chain import fingerprint, is_self_signed, order_chain
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import parse_certs
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from issuers.certmanager.api import GROUP, PLURAL, VERSION, RequestsApi, api_error
from issuers.certmanager.settings import Settings
from issuers.certmanager.status import Phase, RequestState, failure_error, timeout_error
from issuers.certmanager.sweeper import sweep
from issuers.certmanager.watch import RequestWatch

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = [
    "IDENTITIES_ANNOTATION",
    "INSTANCE_LABEL",
    "MANAGED_BY_LABEL",
    "REQUIRED_VERBS",
    "USAGES",
    "CertManagerIssuer",
    "create",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "csr-service"
#: One value per process: its watch sees only its own requests.
INSTANCE_LABEL = "csr-service.io/instance"
#: Same key as istio-csr, so existing approver-policy rules keep matching.
IDENTITIES_ANNOTATION = "istio.cert-manager.io/identities"
REQUEST_ID_ANNOTATION = "csr-service.io/request-id"
PURPOSE_ANNOTATION = "csr-service.io/purpose"
#: What istiod's own CA puts in workload certificates (istio-csr sends only the last two).
USAGES = ("digital signature", "key encipherment", "server auth", "client auth")
#: Least privilege, in the request's namespace (docs/cert-manager.md).
REQUIRED_VERBS = ("create", "get", "list", "watch", "delete")
#: How long one start() waits for the first list of our requests (the service retries start()).
_SYNC_TIMEOUT = 15.0
#: Threads for blocking API calls; each waits on the network, not the CPU.
_API_THREADS = 32


class CertManagerIssuer:
    """Signs through cert-manager CertificateRequests; Issuer plus the lifecycle protocols.

    Args:
        api_client: the shared ``kubernetes.client.ApiClient`` (``runtime.kube()``).
        settings: validated ``--certmanager-*`` settings.
        run_sweeper: run the leftover sweeper here (worker 0 of a replica).
        instance: value of the per-process instance label (random by default).
        api: the CertificateRequest calls (tests pass an in-memory fake; default: ``api_client``'s).
    """

    name = "cert-manager"

    def __init__(
        self,
        api_client: Any,
        settings: Settings,
        *,
        run_sweeper: bool = True,
        instance: str | None = None,
        api: RequestsApi | None = None,
    ) -> None:
        self.settings = settings
        self.instance = instance or secrets.token_hex(6)
        self._pool = ThreadPoolExecutor(max_workers=_API_THREADS, thread_name_prefix="cert-manager-api")
        self._api = api or RequestsApi(api_client, settings.namespace, self._pool)
        self.watch = RequestWatch(
            self._api.list_fn,
            self._api.get,
            label_selector=f"{INSTANCE_LABEL}={self.instance}",
            executor=self._pool,
        )
        # The first sweep right at start: leftovers of a previous process go at once.
        self._sweeper = (
            BackgroundTask(
                "cert-manager-sweeper",
                self._sweep_round,
                every=settings.sweep_interval.total_seconds(),
                first_delay=0,
                logger=log,
            )
            if run_sweeper and settings.sweeping
            else None
        )
        self._deletes: set[asyncio.Task[None]] = set()
        self._started = False
        self._watch_running = False
        self._closed = False
        #: How long one start() waits for the first list of our requests.
        self.sync_timeout = _SYNC_TIMEOUT
        self._status_ca_roots: dict[str, x509.Certificate] = {}

    @property
    def event_loop_calls(self) -> bool:
        """Whether CertificateRequest create/delete run on the event loop (else in threads).

        False when a proxy applies to the apiserver address, or the API client is not
        csr-service's own (see :mod:`csr_service.kube.rest`). Logged at start.
        """
        return self._api.event_loop_calls

    def __repr__(self) -> str:
        return f"CertManagerIssuer({self.settings.describe_issuer()!r}, namespace={self.settings.namespace!r})"

    # --- plumbing ----------------------------------------------------------------------
    async def _call(self, verb: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking API call in our pool; failures become csr_service errors."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except CSRServiceError:
            raise
        except Exception as exc:
            raise api_error(exc, verb=verb, namespace=self.settings.namespace) from exc

    async def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST the request. If our caller gives up meanwhile (server deadline), the create still
        completes (shielded task, or its thread on the fallback path): delete what it made then,
        instead of leaving it to the sweeper."""
        future = asyncio.ensure_future(self._api.acreate(body))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if not self.settings.preserve:
                future.add_done_callback(self._delete_abandoned)
            raise
        except CSRServiceError:
            raise
        except Exception as exc:
            raise api_error(exc, verb="create", namespace=self.settings.namespace) from exc

    def _delete_abandoned(self, future: asyncio.Future[dict[str, Any]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._delete_later(str(future.result()["metadata"]["name"]))

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Check our RBAC, start the shared watch (and the sweeper); raise if unusable."""
        s = self.settings
        if s.trust_status_ca:
            log.warning(
                "--certmanager-trust-status-ca is on: roots reported by cert-manager in status.ca will be "
                "trusted (trust on first use; status.ca may be an intermediate). Prefer --root-ca-file alone."
            )
        await self._check_rbac()
        if not self._watch_running:
            # Started once: if the first list fails, the informer keeps retrying on its own and a
            # later start() (the service retries while we are unavailable) just waits again.
            self.watch.start()
            self._watch_running = True
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(self._pool, self.watch.informer.wait_synced, self.sync_timeout):
            raise UnavailableError(
                "cannot watch CertificateRequests",
                detail=f"listing {PLURAL}.{GROUP} in namespace {s.namespace} did not succeed within "
                f"{self.sync_timeout:.0f}s (the watch keeps retrying; see the informer's log lines)",
            )
        self._started = True
        if self._sweeper is not None:
            self._sweeper.start()
        log.info(
            "cert-manager issuer ready: signing with %s%s, requests in namespace %s labelled %s=%s, timeout %.0fs%s",
            s.describe_issuer(),
            f" (own certificates: {s.describe_issuer('serving')})" if s.serving_issuer else "",
            s.namespace,
            INSTANCE_LABEL,
            self.instance,
            s.timeout.total_seconds(),
            ", preserving requests" if s.preserve else "",
        )
        log.info(
            "CertificateRequest create/delete: %s",
            "event-loop HTTP client"
            if self.event_loop_calls
            else "kubernetes client in threads (a proxy applies to the apiserver address)",
        )

    async def _check_rbac(self) -> None:
        from kubernetes.client.exceptions import ApiException

        loop = asyncio.get_running_loop()
        try:
            missing = await loop.run_in_executor(self._pool, self._api.missing_verbs, REQUIRED_VERBS)
        except ApiException as exc:
            if exc.status == 403:  # SelfSubjectAccessReview itself not allowed: find out on first use
                log.info("cannot check RBAC with SelfSubjectAccessReview (403); skipping the check")
                return
            raise api_error(exc, verb="check access to", namespace=self.settings.namespace) from exc
        except Exception as exc:
            raise api_error(exc, verb="check access to", namespace=self.settings.namespace) from exc
        if missing:
            ns = self.settings.namespace
            raise FailedPreconditionError(
                f"csr-service lacks RBAC permission(s) {', '.join(missing)} on {PLURAL}.{GROUP} in namespace {ns}",
                detail=f"SelfSubjectAccessReview: verb(s) {', '.join(missing)} on {PLURAL}.{GROUP} in namespace "
                f"{ns} not allowed; grant {', '.join(REQUIRED_VERBS)} (see docs/cert-manager.md)",
            )

    async def stop(self) -> None:
        """Stop the sweeper, finish pending deletes, stop the watch (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            await self._sweeper.stop()
        if self._deletes:
            await asyncio.wait(set(self._deletes), timeout=5)
        if self._watch_running:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.watch.stop)
        await self._api.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> tuple[bool, str]:
        """Usable once the first list succeeded (the informer keeps reconnecting after that)."""
        if not self._started or self._closed:
            return False, "cert-manager issuer not started"
        if not self.watch.informer.synced.is_set():
            return False, "CertificateRequest watch not synced"
        return True, f"signing with cert-manager {self.settings.describe_issuer()}"

    # --- Issuer ------------------------------------------------------------------------
    def request_body(self, request: SigningRequest) -> dict[str, Any]:
        """The CertificateRequest for ``request`` (generateName: the apiserver picks the name)."""
        s = self.settings
        identities = list(request.uris) or [*request.dns_names, *request.ip_addresses]
        annotations = dict(s.annotations)
        annotations.update(
            {
                IDENTITIES_ANNOTATION: ",".join(identities),
                REQUEST_ID_ANNOTATION: request.request_id,
                PURPOSE_ANNOTATION: request.purpose,
            }
        )
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CertificateRequest",
            "metadata": {
                "generateName": "csr-service-",
                "namespace": s.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY, INSTANCE_LABEL: self.instance},
                "annotations": annotations,
            },
            "spec": {
                "request": base64.b64encode(request.csr_pem).decode("ascii"),
                "isCA": False,
                "duration": f"{max(1, int(request.ttl.total_seconds()))}s",
                "usages": list(request.usages or USAGES),
                "issuerRef": s.issuer_ref_for(request.purpose),
            },
        }

    async def sign(self, request: SigningRequest) -> IssuedChain:
        """Create a CertificateRequest, wait for its outcome on the shared watch, delete it."""
        if not self._started or self._closed:
            raise UnavailableError(
                "the cert-manager issuer is not running", detail="sign() before start()/after stop()"
            )
        s = self.settings
        issuer = s.describe_issuer(request.purpose)
        _check_csr_names(request)
        created = await self._create(self.request_body(request))
        name = str(created["metadata"]["name"])
        started = time.monotonic()
        waiter = self.watch.register(name, created)
        try:
            try:
                async with asyncio.timeout(s.timeout.total_seconds()):
                    state = await waiter.done
            except TimeoutError:
                waited = time.monotonic() - started
                last = waiter.state or RequestState(Phase.WAITING_FOR_APPROVAL)
                log.warning(
                    "CertificateRequest %s/%s (request %s) timed out after %.1fs %s",
                    s.namespace,
                    name,
                    request.request_id,
                    waited,
                    last.describe(),
                )
                raise timeout_error(last, name=f"{s.namespace}/{name}", issuer=issuer, waited=waited) from None
        finally:
            self.watch.unregister(name)
            if not s.preserve:
                self._delete_later(name)
        if state.phase is not Phase.ISSUED:
            raise failure_error(state, name=f"{s.namespace}/{name}", issuer=issuer)
        log.debug(
            "CertificateRequest %s/%s (request %s) issued in %.1f ms",
            s.namespace,
            name,
            request.request_id,
            (time.monotonic() - started) * 1000,
        )
        return self._issued_chain(state, f"{s.namespace}/{name}")

    def _issued_chain(self, state: RequestState, name: str) -> IssuedChain:
        try:
            issued = parse_certs(state.certificate, what=f"CertificateRequest {name}: status.certificate")
        except ValueError as exc:
            raise InternalError(
                "the certificate authority returned an unreadable certificate", detail=str(exc)
            ) from exc
        try:
            ca = parse_certs(state.ca, what="status.ca") if state.ca else []
        except ValueError as exc:  # best effort by definition: never fail a signed request over it
            log.debug("CertificateRequest %s: ignoring unreadable status.ca: %s", name, exc)
            ca = []
        leaf = issued[0]
        if self.settings.trust_status_ca:
            self._learn_roots(ca, name)
        # status.ca only helps to complete the path; trust comes from --root-ca-file.
        return IssuedChain(leaf=leaf, chain=tuple(order_chain(leaf, [*issued[1:], *ca])))

    def _learn_roots(self, ca: Sequence[x509.Certificate], name: str) -> None:
        for cert in ca:
            fp = fingerprint(cert)
            if is_self_signed(cert) and fp not in self._status_ca_roots:
                self._status_ca_roots[fp] = cert
                log.warning(
                    "trusting root %r (sha256 %s) from status.ca of CertificateRequest %s "
                    "(--certmanager-trust-status-ca: trust on first use)",
                    cert.subject.rfc4514_string(),
                    fp,
                    name,
                )

    async def roots(self) -> Sequence[x509.Certificate]:
        """Roots seen in ``status.ca``, only with ``--certmanager-trust-status-ca``; else none."""
        return list(self._status_ca_roots.values()) if self.settings.trust_status_ca else []

    # --- cleanup -----------------------------------------------------------------------
    def _delete_later(self, name: str) -> None:
        # Not awaited by the caller: the answer should not wait for housekeeping, and a
        # cancelled request (server deadline) must still clean up.
        task = asyncio.get_running_loop().create_task(self._delete(name))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await self._api.adelete(name)
        except (ApiException, KubeAPIError) as exc:
            if exc.status != 404:
                err = api_error(exc, verb="delete", namespace=self.settings.namespace)
                log.warning("could not delete CertificateRequest %s (the sweeper will retry): %s", name, err.detail)
        except Exception as exc:  # noqa: BLE001 (connection trouble: the sweeper catches it later)
            log.warning("could not delete CertificateRequest %s (the sweeper will retry): %s", name, exc)

    async def sweep_once(self, max_age: timedelta | None = None) -> int:
        """Delete our leftovers older than ``max_age`` (default ``--certmanager-sweep-age``); returns how many."""
        age = max_age or self.settings.sweep_age
        if age <= timedelta(0):
            raise ValueError("sweep_once: max_age must be positive")
        return await self._call(
            "delete",
            functools.partial(
                sweep,
                self._api.list_fn,
                self._api.delete,
                label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}",
                max_age=age,
            ),
        )

    async def _sweep_round(self) -> None:
        try:
            swept = await self.sweep_once()
        except CSRServiceError as exc:
            log.warning("CertificateRequest sweep failed: %s", exc.detail)
            return
        if swept:
            log.info("sweeper deleted %d leftover CertificateRequest(s)", swept)


def _check_csr_names(request: SigningRequest) -> None:
    """cert-manager certifies the CSR's own names: they must be exactly the ones to certify.

    The pipeline only passes CSRs whose SANs are the caller's identity, and the serving
    certificate's CSR carries its names, so this holds in practice; checking it keeps the
    contract (names come from the request) even for a caller that breaks that rule.
    """
    names = subject_alt_names(request.csr).sorted_names()
    wanted = request.sorted_names()
    if names != wanted:
        raise InternalError(
            "the certificate request cannot be signed as asked",
            detail=f"cert-manager signs the CSR's names URIs={names[0]} DNS={names[1]} IPs={names[2]}, but "
            f"URIs={wanted[0]} DNS={wanted[1]} IPs={wanted[2]} were to be certified",
        )


def create(values: Mapping[str, Any], runtime: Runtime) -> CertManagerIssuer:
    """Build the cert-manager issuer from its ``certmanager-*`` options (see ``options.py``)."""
    settings = Settings.from_values(values)
    # runtime.kube() raises a ConfigError naming --kubeconfig when there is no cluster to talk to.
    return CertManagerIssuer(runtime.kube(), settings, run_sweeper=runtime.worker_index == 0)
