"""The issuer contract: the one interface every signing backend implements.

An issuer turns an already-authorised signing request into a certificate chain. The request
pipeline has done everything else (authentication, CSR validation, deciding the lifetime)
before it calls :meth:`Issuer.sign`, and verifies what comes back afterwards; an issuer
therefore holds no policy of its own beyond what its backend enforces.

The contract (every backend MUST, and ``tests/conformance`` checks it):

1. ``sign`` is a coroutine and MUST NOT block the event loop for more than a few
   milliseconds: run CPU-heavy work or synchronous client libraries in a thread.
2. The issued leaf MUST carry the public key of ``request.csr``, and exactly the names in
   ``request.uris``, ``request.dns_names`` and ``request.ip_addresses`` as its
   SubjectAltName (for workloads: the single SPIFFE URI; nothing from the CSR is copied
   blindly).
3. ``request.ttl`` is the lifetime the pipeline decided (already clamped to the configured
   maximum and to the signing CA's NotAfter when known). The issuer MAY issue a shorter
   certificate (its backend may truncate) but MUST NOT issue a longer one; NotAfter
   MUST NOT exceed ``now + ttl`` (plus the two-minute backdating of NotBefore aside).
4. :attr:`IssuedChain.chain` holds the certificates above the leaf in order: the first
   one signed the leaf and each signed the one before it. It MAY end with a root; the
   pipeline removes roots and appends the configured trust bundle itself.
5. Failures are raised as :mod:`csr_service.errors` classes, translated from the backend's
   own exceptions with ``raise ... from exc``:
   - backend unreachable, sealed, timed out, 5xx → :class:`~csr_service.errors.UnavailableError`
   - backend rate limit → :class:`~csr_service.errors.ResourceExhaustedError`
   - backend refuses a CSR that passed our checks (misconfigured role/issuer), CA expired
     → :class:`~csr_service.errors.FailedPreconditionError`, ``public`` says what to fix
   - a request explicitly denied (e.g. cert-manager Denied) → ``PermissionDeniedError``
   - not signed in time → ``DeadlineExceededError``
   - unparseable backend output → ``InternalError``
   Anything else is a bug and surfaces as INTERNAL.
6. ``public`` messages never include tokens, keys or the CSR; ``detail`` may name paths,
   roles and backend messages.
7. Proof of possession: the pipeline verifies the CSR's self-signature before ``sign``,
   unless the issuer sets the class attribute ``checks_csr_signature = True``. An issuer MAY
   set it only when its backend refuses, without issuing anything, every CSR whose signature
   does not verify (Vault and OpenBao PKI do: "request signature invalid"). The signature
   is then verified once, by the backend, instead of twice (~60 µs of CPU per ECDSA P-256
   CSR here). When such an issuer raises ``FailedPreconditionError`` the pipeline checks
   the signature itself, so a forged CSR still gets INVALID_ARGUMENT, not a message about
   the backend's configuration. The conformance suite sends every issuer that claims this a
   CSR with a broken signature and requires a refusal.

Optional abilities are separate protocols, checked with ``isinstance``:
:class:`RootsProvider` (the issuer can tell which roots it chains to), :class:`SigningCAInfo`
(it knows the signing CA's NotAfter so the pipeline can cap TTLs up front),
:class:`Startable` and :class:`Closable` (lifecycle), :class:`HealthReporter` (readiness).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

__all__ = [
    "Closable",
    "HealthReporter",
    "IssuedChain",
    "Issuer",
    "RootsProvider",
    "SigningCAInfo",
    "SigningRequest",
    "Startable",
]


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """An authorised request to sign: the CSR (its key) plus exactly the names to certify."""

    csr: x509.CertificateSigningRequest
    csr_pem: bytes
    ttl: timedelta
    uris: Sequence[str] = ()
    dns_names: Sequence[str] = ()
    ip_addresses: Sequence[str] = ()
    #: Correlates log lines across the pipeline and the backend (never secret).
    request_id: str = "-"
    #: "workload" for CreateCertificate; "serving"/"istiod" for certificates we need ourselves.
    purpose: str = "workload"
    #: The CSR's public key when the caller has parsed it already (see :meth:`public_key`).
    csr_public_key: CertificatePublicKeyTypes | None = field(default=None, repr=False, compare=False)

    def sorted_names(self) -> tuple[list[str], list[str], list[str]]:
        """(URIs, DNS names, IP addresses) to certify, each sorted: compares with
        :meth:`csr_service.pki.names.SubjectAltNames.sorted_names`."""
        return sorted(self.uris), sorted(self.dns_names), sorted(self.ip_addresses)

    def public_key(self) -> CertificatePublicKeyTypes:
        """The CSR's public key. Parsed at most once (the pipeline passes the one its CSR checks
        parsed): an EC key parse costs ~5 µs, and both the issuer's and the pipeline's checks
        of the issued leaf need it."""
        key = self.csr_public_key
        if key is None:
            key = self.csr.public_key()
            object.__setattr__(self, "csr_public_key", key)  # a cache, not a change of value
        return key


@dataclass(frozen=True, slots=True)
class IssuedChain:
    """What an issuer returns: the leaf and the CA certificates above it, leaf's issuer first."""

    leaf: x509.Certificate
    chain: Sequence[x509.Certificate] = field(default_factory=tuple)


@runtime_checkable
class Issuer(Protocol):
    """A signing backend. See the module docstring for the full contract."""

    #: Backend name as used in ``--issuer`` (e.g. ``local``, ``vault``, ``cert-manager``).
    name: str

    async def sign(self, request: SigningRequest) -> IssuedChain:
        """Sign ``request`` and return the leaf with its chain, or raise a csr_service error."""
        ...


@runtime_checkable
class RootsProvider(Protocol):
    """The issuer can report the root certificates its chains end in."""

    async def roots(self) -> Sequence[x509.Certificate]:
        """Roots the issuer's chains end in. Only trusted when the operator chose so."""
        ...


@runtime_checkable
class SigningCAInfo(Protocol):
    """The issuer knows when its signing CA expires (TTL caps are applied before signing)."""

    def signing_ca_not_after(self) -> datetime | None:
        """NotAfter of the current signing CA certificate, if known."""
        ...


@runtime_checkable
class Startable(Protocol):
    """The issuer needs to connect/log in/load before its first ``sign``."""

    async def start(self) -> None:
        """Prepare the backend; raise a csr_service error if it cannot be used."""
        ...


@runtime_checkable
class Closable(Protocol):
    """The issuer holds resources (clients, watches, threads) to release at shutdown."""

    async def aclose(self) -> None:
        """Release resources; idempotent."""
        ...


@runtime_checkable
class HealthReporter(Protocol):
    """The issuer can say, without blocking, whether it is usable (for /readyz)."""

    def health(self) -> tuple[bool, str]:
        """(usable, human-readable reason). Must be cheap: never call the backend here."""
        ...
