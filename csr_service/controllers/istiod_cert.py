"""Secret ``istiod-tls`` for istiod running with ``ENABLE_CA_SERVER=false`` (leader only).

Without its own CA, istiod serves xDS and webhooks with the certificate it finds in Secret
``istiod-tls`` of its namespace (``tls.crt``, ``tls.key``, ``ca.crt``; the istiod chart
mounts that one name for every revision, volume ``istio-csr-dns-cert``). So one Secret carries
the service names of all configured revisions — ``istiod.<ns>.svc`` for ``default``,
``istiod-<rev>.<ns>.svc`` for the others — plus ``--istiod-additional-dns-names`` and the
URI ``spiffe://<td>/ns/<ns>/sa/istiod-service-account``, like istio-csr's ``istiod``
Certificate.

It is issued by the active issuer (``purpose="istiod"``), checked against the trust bundle
here (the request pipeline's verifier is for workload certificates), and written with one
create or one full replace, so istiod never sees a key from one issuance next to a
certificate from another. Reissued when missing, deleted, edited, due (``renew-before``),
when the names change, or when it no longer chains to the trust bundle (root rotation:
``ca.crt`` follows the bundle).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from csr_service.common.errors import CSRServiceError, InternalError
from csr_service.common.lifecycle import BackgroundTask
from csr_service.kube.util import EventRecorder, LoopInformer, api_status
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pipeline.own_cert import issue_own_certificate
from csr_service.pki.chain import ChainError, build_path
from csr_service.pki.keys import KeyType
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import cert_to_pem, key_to_pem, load_private_key, parse_certs, same_public_key
from csr_service.trust.bundle import TrustBundle

__all__ = ["SECRET_NAME", "IstiodCertController", "IstiodCertSpec", "renewal_reason"]

log = logging.getLogger(__name__)

SECRET_NAME = "istiod-tls"
#: Never reissue more often than this, whatever the issuer returns (no hot loop).
MIN_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class IstiodCertSpec:
    """What the istiod certificate must look like."""

    namespace: str
    revisions: Sequence[str]
    trust_domain: str
    duration: timedelta
    renew_before: timedelta
    key_type: KeyType
    additional_dns_names: Sequence[str] = ()

    @property
    def dns_names(self) -> tuple[str, ...]:
        names = [
            f"istiod.{self.namespace}.svc" if rev == "default" else f"istiod-{rev}.{self.namespace}.svc"
            for rev in self.revisions
        ]
        return tuple(dict.fromkeys([*names, *self.additional_dns_names]))

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/istiod-service-account"


def _secret_bytes(secret: Any, key: str) -> bytes:
    raw = ((secret.data if secret is not None else None) or {}).get(key)
    return base64.b64decode(raw) if raw else b""


def renewal_reason(secret: Any, spec: IstiodCertSpec, trust: TrustBundle, now: datetime) -> tuple[str | None, datetime]:
    """Why the Secret must be (re)issued (None: it is fine) and when to look again."""
    if secret is None:
        return "missing", now
    try:
        certs = parse_certs(_secret_bytes(secret, "tls.crt"), what="tls.crt")
        key = load_private_key(_secret_bytes(secret, "tls.key"), what="tls.key")
    except ValueError as exc:
        return f"unreadable ({exc})", now
    if not certs:
        return "no certificate in tls.crt", now
    leaf = certs[0]
    due = leaf.not_valid_after_utc - spec.renew_before
    if now >= due:
        return "due for renewal", now
    if not same_public_key(leaf, key):
        return "tls.key does not match tls.crt", now
    names = subject_alt_names(leaf)
    if not names.present:
        return "no SubjectAltName", now
    if set(names.dns_names) != set(spec.dns_names) or names.uris != (spec.uri,):
        return "names changed", now
    snapshot = trust.current
    if _secret_bytes(secret, "ca.crt").decode(errors="replace") != snapshot.pem:
        return "trust bundle changed", now
    try:
        build_path(leaf, certs[1:], snapshot.roots, now=now)
    except ChainError as exc:
        return f"does not chain to the trust bundle ({exc})", now
    return None, due


class IstiodCertController:
    """Keeps Secret ``istiod-tls`` valid. A restartable Component (leader only).

    ``write(data, existing)`` writes the Secret's three keys (``existing``: the Secret as
    last watched, None to create it); by default one create or one full replace through
    ``api``. Tests pass their own and call :meth:`issue_and_write` directly.
    """

    name = "istiod-cert"
    all_workers = False

    def __init__(
        self,
        api: Any,
        issuers: IssuerSlot,
        trust: TrustBundle,
        spec: IstiodCertSpec,
        *,
        write: Callable[[dict[str, bytes], Any], None] | None = None,
    ) -> None:
        self._api = api
        self._write = write or self._replace
        self._issuers = issuers
        self._trust = trust
        self.spec = spec
        self._informer: LoopInformer | None = None
        self._watching = False
        self._next_look = 0.0
        # A look at once, then when the certificate is due, after a write or a failure, or
        # when woken by the Secret's watch or a trust-bundle change.
        self._loop = BackgroundTask(
            "istiod-cert", self._round, every=lambda: self._next_look, first_delay=0, logger=log
        )
        self._last_issue = 0.0
        self._failures = 0
        #: Counts for tests and metrics.
        self.stats = {"issued": 0, "errors": 0}
        self._events = EventRecorder(api)
        trust.add_listener(lambda _snapshot: self._loop.wake())

    async def start(self) -> None:
        from kubernetes import client

        self._informer = LoopInformer(
            client.CoreV1Api(self._api).list_namespaced_secret,
            lambda _kind, _obj: self._loop.wake(),
            name="istiod-tls",
            list_kwargs={"namespace": self.spec.namespace, "field_selector": f"metadata.name={SECRET_NAME}"},
        )
        self._watching = False
        self._last_issue = 0.0
        self._failures = 0
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self._informer is not None:
            await self._informer.stop()
            self._informer = None

    def _cached(self) -> Any:
        """The Secret as last watched; None if missing, or before start (then a write creates it)."""
        if self._informer is None:
            return None
        return self._informer.cache.get(f"{self.spec.namespace}/{SECRET_NAME}")

    async def _round(self) -> None:
        """Look at the Secret, (re)issue it if needed, and set when to look again."""
        assert self._informer is not None
        self._next_look = MIN_INTERVAL  # what an unexpected failure of this round leaves: no hot loop
        if not self._watching:
            # In the task, not in start(): the elector waits for start(), and a list can be slow.
            await self._informer.start()
            self._watching = True
        loop = asyncio.get_running_loop()
        now = datetime.now(UTC)
        reason, next_check = renewal_reason(self._cached(), self.spec, self._trust, now)
        wait = max((next_check - now).total_seconds(), 0.0)
        if reason is not None:
            # Right after a write the informer may not show it yet: wait for its event.
            pause = MIN_INTERVAL - (loop.time() - self._last_issue)
            if self._last_issue and pause > 0:
                wait = pause
            else:
                try:
                    self._last_issue = loop.time()
                    await self.issue_and_write(reason)
                    self._failures = 0
                    wait = MIN_INTERVAL
                except Exception as exc:  # noqa: BLE001 (issuer or apiserver trouble: retry)
                    self._failures += 1
                    self.stats["errors"] += 1
                    wait = min(60.0, 2.0**self._failures) * (0.5 + random.random() / 2)  # noqa: S311
                    log.error("istiod certificate not written (%s; retry in %.0fs): %s", reason, wait, exc)
                    self._event("IstiodCertificateFailed", f"not written ({reason}), retrying: {exc}", warning=True)
        self._next_look = wait

    async def issue_and_write(self, reason: str) -> None:
        """Issue a fresh istiod certificate, verify it, and write the whole Secret in one call."""
        spec = self.spec
        issuer = self._issuers.current
        snapshot = self._trust.current
        try:
            own = await issue_own_certificate(
                issuer,
                snapshot.roots,
                ttl=spec.duration,
                key_type=spec.key_type,
                purpose="istiod",
                request_id="istiod-cert",
                dns_names=spec.dns_names,
                uris=(spec.uri,),
            )
        except ChainError as exc:
            raise InternalError("istiod certificate does not chain to the trust bundle", detail=str(exc)) from exc
        key, issued, path = own.key, own.issued, own.path
        data = {
            "tls.crt": "".join(cert_to_pem(c) for c in path[:-1]).encode(),
            "tls.key": key_to_pem(key),
            "ca.crt": snapshot.pem.encode(),
        }
        await asyncio.to_thread(self._write, data, self._cached())
        self.stats["issued"] += 1
        self._event(
            "IstiodCertificateIssued",
            f"issued by {issuer.name} ({reason}), valid until {issued.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            warning=False,
        )
        log.info(
            "istiod certificate written to %s/%s (%s) by %s for %s, valid until %s",
            spec.namespace,
            SECRET_NAME,
            reason,
            issuer.name,
            ", ".join(spec.dns_names),
            issued.leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def _event(self, reason: str, message: str, *, warning: bool) -> None:
        """Record a Kubernetes Event on the Secret, in the background."""
        uid = getattr(getattr(self._cached(), "metadata", None), "uid", None)
        self._events.record(
            kind="Secret",
            namespace=self.spec.namespace,
            name=SECRET_NAME,
            uid=uid,
            reason=reason,
            message=message,
            warning=warning,
        )

    def _replace(self, data: dict[str, bytes], existing: Any) -> None:
        """The default ``write``."""
        from kubernetes import client

        core = client.CoreV1Api(self._api)
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=SECRET_NAME,
                namespace=self.spec.namespace,
                labels={"app.kubernetes.io/managed-by": "csr-service"},
            ),
            type="kubernetes.io/tls",
            data={k: base64.b64encode(v).decode() for k, v in data.items()},
        )
        try:
            if existing is None:
                core.create_namespaced_secret(self.spec.namespace, body)
                return
            # A full replace guarded by resourceVersion: all three keys change together, and a
            # concurrent edit makes it fail (409) instead of being overwritten half-way.
            meta: Any = body.metadata
            old: Any = existing.metadata
            meta.resource_version = old.resource_version
            meta.labels = {**(old.labels or {}), **meta.labels}
            meta.annotations = old.annotations
            core.replace_namespaced_secret(SECRET_NAME, self.spec.namespace, body)
        except client.ApiException as exc:
            raise CSRServiceError(
                "cannot write the istiod Secret",
                detail=f"{self.spec.namespace}/{SECRET_NAME}: HTTP {api_status(exc)} {exc.reason}",
            ) from exc
