"""The gRPC server's own TLS certificate: issued by the active issuer, renewed, hot-swapped.

istio-agent verifies the CA's serving certificate against the root it gets from the
``istio-ca-root-cert`` ConfigMap, i.e. the trust bundle we publish. So the serving
certificate is issued by the same issuer as workload certificates and chains to the same
roots. It is renewed when a third of its life is left (or when the roots change), and the
new one is handed to gRPC through a dynamic credentials callback that is consulted on each
new handshake: existing connections are not dropped, new ones get the new certificate.

Renewal failures are retried with backoff while the old certificate is still valid (istio-csr
#141: a serving certificate that silently expired took a whole mesh down).

Until the first certificate is obtained nothing listens, so the reason must be visible: every
failure is logged as one line that says what to change (the issuer refused the names, the
chain does not reach the trust bundle, the backend is down), and ``/readyz`` shows the same
line (:attr:`ServingCertificate.last_error`). A backend that issues workload certificates
only (a Vault role allowing SPIFFE URIs alone) must also allow the serving names
(``--serving-dns-names``/``--serving-ip-addresses``; docs/install.md, "The serving certificate").
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc

from csr_service.common.errors import (
    CSRServiceError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    MissingUsageError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.common.lifecycle import BackgroundTask
from csr_service.pipeline.handler import IssuerSlot
from csr_service.pipeline.own_cert import issue_own_certificate
from csr_service.pki.chain import ChainError
from csr_service.pki.keys import KeyType
from csr_service.pki.pem import cert_to_pem, key_to_pem
from csr_service.trust.bundle import TrustBundle

__all__ = ["ServingCertificate", "ServingMaterial"]

log = logging.getLogger(__name__)

#: Where the docs say which names an issuer must allow, and how else to serve.
_DOCS = "docs/install.md#the-serving-certificate"


def _one_line(text: str) -> str:
    """Backend messages span lines (cert-manager's Vault errors); a readiness reason cannot."""
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class ServingMaterial:
    chain_pem: bytes
    key_pem: bytes
    not_before: datetime
    not_after: datetime

    def renew_at(self) -> datetime:
        """When two thirds of the lifetime have passed."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


class ServingCertificate:
    """Obtains, renews and serves (via gRPC dynamic credentials) the TLS serving certificate."""

    def __init__(
        self,
        issuers: IssuerSlot,
        trust: TrustBundle,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        duration: timedelta,
        key_type: KeyType,
    ) -> None:
        self._issuers = issuers
        self._trust = trust
        self._dns = tuple(dns_names)
        self._ips = tuple(ip_addresses)
        self._duration = duration
        self._key_type = key_type
        self._material: ServingMaterial | None = None
        self._lock = threading.Lock()
        self._failures = 0
        self._last_error: str | None = None
        self._renewal = BackgroundTask("serving-cert-renewal", self._renew, every=self._next_renewal, logger=log)
        trust.add_listener(lambda _snapshot: self.request_renewal())

    @property
    def material(self) -> ServingMaterial | None:
        return self._material

    @property
    def last_error(self) -> str | None:
        """Why the last attempt to obtain or renew failed (one line, for ``/readyz``); None after a success."""
        return self._last_error

    def _names(self) -> str:
        parts = [f"DNS {','.join(self._dns)}"] if self._dns else []
        if self._ips:
            parts.append(f"IP {','.join(self._ips)}")
        return " and ".join(parts) or "no names"

    def explain(self, exc: BaseException, issuer: str) -> str:
        """One line an operator can act on: what failed, the backend's own words, what to change."""
        names = self._names()
        detail = _one_line(exc.detail if isinstance(exc, CSRServiceError) else str(exc))
        if isinstance(exc, MissingUsageError):
            return (
                f"{detail}; the issuer must issue TLS server certificates for {names} (Vault role: server_flag=true, "
                f"key_usage DigitalSignature; see {_DOCS})"
            )
        if isinstance(exc, FailedPreconditionError | PermissionDeniedError | InvalidRequestError):
            return (
                f"issuer {issuer} refused the serving certificate for {names}: {detail}; the issuer must allow "
                f"these names (--serving-dns-names/--serving-ip-addresses; see {_DOCS})"
            )
        if isinstance(exc, UnavailableError | DeadlineExceededError | ResourceExhaustedError):
            return f"issuer {issuer} could not sign the serving certificate for {names} (retrying): {detail}"
        if isinstance(exc, ChainError):
            return (
                f"the serving certificate for {names} issued by {issuer} does not chain to the trust bundle: "
                f"{detail}; the trust bundle (--root-ca-file/--root-ca-configmap/--root-ca-secret) must hold "
                "the issuer's root"
            )
        return f"issuer {issuer} did not issue the serving certificate for {names}: {detail}"

    async def obtain(self) -> ServingMaterial:
        """Issue a fresh serving certificate and verify it against the trust bundle."""
        try:
            issuer = self._issuers.current
            own = await issue_own_certificate(
                issuer,
                self._trust.current.roots,
                ttl=self._duration,
                key_type=self._key_type,
                purpose="serving",
                request_id="serving-cert",
                dns_names=self._dns,
                ip_addresses=self._ips,
            )
        except ChainError as exc:
            self._last_error = self.explain(exc, issuer.name)
            raise CSRServiceError(
                "serving certificate does not chain to the trust bundle", detail=self._last_error
            ) from exc
        except CSRServiceError as exc:
            self._last_error = self.explain(exc, issuer.name)
            raise
        leaf = own.issued.leaf
        material = ServingMaterial(
            chain_pem="".join(cert_to_pem(c) for c in own.path[:-1]).encode(),
            key_pem=key_to_pem(own.key),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )
        with self._lock:
            self._material = material
        self._last_error = None
        log.info(
            "serving certificate issued by %s for %s, valid until %s",
            issuer.name,
            ", ".join((*self._dns, *self._ips)),
            material.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        return material

    def request_renewal(self) -> None:
        """Renew now (e.g. the roots changed). Safe to call from any callback on the loop.

        Before :meth:`start` it does nothing: start obtains a certificate for the roots of then.
        """
        if self._renewal.running:
            self._renewal.wake()

    async def start(self) -> None:
        """Obtain the first certificate (retrying) and start the renewal loop."""
        delay = 1.0
        while self._material is None:
            try:
                await self.obtain()
            except CSRServiceError as exc:
                # Nothing listens until this succeeds: say why, in one line, every time.
                why = self._last_error or _one_line(exc.detail)
                log.error("serving certificate not obtained, not listening yet (retry in %.0fs): %s", delay, why)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self._failures = 0
        self._renewal.start()

    async def stop(self) -> None:
        await self._renewal.stop()

    def _next_renewal(self) -> float:
        """Seconds until the next renewal: at two thirds of the lifetime, sooner after failures."""
        if self._failures:
            return min(2.0**self._failures, 30.0) * (0.5 + random.random() / 2)  # noqa: S311 (jitter)
        material = self._material
        assert material is not None
        return (material.renew_at() - datetime.now(UTC)).total_seconds()

    async def _renew(self) -> None:
        material = self._material
        assert material is not None
        try:
            await self.obtain()
            self._failures = 0
        except Exception as exc:  # noqa: BLE001 (any failure: keep the old certificate, retry)
            self._failures += 1
            left = (material.not_after - datetime.now(UTC)).total_seconds()
            if not isinstance(exc, CSRServiceError):  # obtain() explained those already
                self._last_error = self.explain(exc, self._issuers.current.name)
            why = self._last_error or _one_line(str(exc))
            log.error("serving certificate renewal failed (%d, %.0fs of validity left): %s", self._failures, left, why)

    # --- gRPC credentials ---------------------------------------------------------------
    def _config(self, material: ServingMaterial, client_roots: str | None) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.chain_pem)],
            root_certificates=client_roots.encode() if client_roots is not None else None,
        )

    def server_credentials(self, *, require_client_certificate: bool = False) -> grpc.ServerCredentials:
        """Credentials whose certificate follows renewals without a restart.

        With ``require_client_certificate`` the handshake requires a client certificate that
        chains to the trust bundle; the bundle is read again on each new handshake, so root
        rotations apply to new connections at once (existing ones keep their verified peer).
        """
        material = self._material
        if material is None:
            raise RuntimeError("serving certificate not obtained yet")

        def roots() -> tuple[int, str | None]:
            snapshot = self._trust.current
            return snapshot.version, snapshot.pem if require_client_certificate else None

        version, pem = roots()
        fetched: list[tuple[ServingMaterial, int]] = [(material, version)]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC core on its own thread for each new handshake: return a new config
            # only when the certificate or (for mTLS) the trust bundle changed, else None
            # ("keep using the current one").
            with self._lock:
                current = self._material
                trust_version, trust_pem = roots()
                if current is None or fetched[0] == (current, trust_version):
                    return None
                fetched[0] = (current, trust_version)
            return self._config(current, trust_pem)

        # grpc-stubs types the fetcher as never returning None, but None means "unchanged".
        return grpc.dynamic_ssl_server_credentials(
            self._config(material, pem),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=require_client_certificate,
        )
