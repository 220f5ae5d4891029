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
   blindly), and the key usages of Istio's own CA: KeyUsage digitalSignature (plus
   keyEncipherment for an RSA key), ExtKeyUsage serverAuth and clientAuth, not CA:TRUE. For
   ``purpose`` "serving"/"istiod", digitalSignature and serverAuth suffice. The pipeline
   refuses any other leaf with FAILED_PRECONDITION naming the issuer and the missing usage
   (``csr_service.pipeline.verify.missing_usages``), counted as the issuer's sign error.
3. ``request.ttl`` is the lifetime the pipeline decided (already clamped to the configured
   maximum and to the signing CA's NotAfter when known). The issuer MAY issue a shorter
   certificate (its backend may truncate) but MUST NOT issue a longer one; NotAfter
   MUST NOT exceed ``now + ttl`` (plus the two-minute backdating of NotBefore aside).
4. :attr:`IssuedChain.chain` holds the certificates above the leaf in order: the first
   one signed the leaf and each signed the one before it. It MAY end with a root; the
   pipeline removes roots and appends the configured trust bundle itself.
5. Failures are raised as :mod:`csr_service.common.errors` classes, translated from the backend's
   own exceptions with ``raise ... from exc``:
   - backend unreachable, sealed, timed out, 5xx → :class:`~csr_service.common.errors.UnavailableError`
   - backend rate limit → :class:`~csr_service.common.errors.ResourceExhaustedError`
   - backend refuses a CSR that passed our checks (misconfigured role/issuer), CA expired
     → :class:`~csr_service.common.errors.FailedPreconditionError`, ``public`` says what to fix
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
8. Signed here: the pipeline verifies the issued leaf's signature with ``chain[0]``'s key,
   unless the issuer sets the class attribute ``signs_in_process = True``. An issuer MAY set
   it only when it signs the leaf itself, in this process, with a private key it has checked
   against ``chain[0]``'s public key when it loaded them (the local CA refuses a key that does
   not match its certificate), and returns that very ``chain[0]``. The pipeline then still
   verifies the first leaf of every chain (and trust bundle) with the whole path, and every
   leaf's key, names, lifetime and issuer name; it skips only the per-leaf signature check
   (~80 µs of CPU per ECDSA P-256 certificate here, the check a remote backend needs). The
   conformance suite verifies every leaf of an issuer that claims this against ``chain[0]``
   with cryptography's own check.

Optional abilities. The core asks an issuer nothing that is not listed here, and it works
out which abilities an issuer has once, when the issuer is made active
(:meth:`IssuerAbilities.of`), never per request:

- ``checks_csr_signature: bool`` (class attribute, default False): item 7 above.
- ``signs_in_process: bool`` (class attribute, default False): item 8 above.
- ``roots_are_configuration: bool`` (class attribute, default False): the roots that
  :meth:`RootsProvider.roots` reports are the operator's own configuration (files, a Secret),
  not something learned from a remote backend, so the trust bundle may be built from them
  without ``--root-ca-file``. A remote backend's roots are trust on first use and are only
  taken with ``--trust-roots-from-issuer``.
- :class:`RootsProvider`: ``roots()``, the roots the issuer's chains end in.
- :class:`RootsWatcher`: ``add_roots_listener(fn)``, call ``fn(roots)`` when they change
  (a rotated CA), so the trust bundle follows.
- :class:`SigningCAInfo`: ``signing_ca_not_after()``, so lifetimes are capped before signing.
  Must be cheap: it is called on every request.
- :class:`~csr_service.common.lifecycle.Lifecycle`: ``start()`` (connect, log in, load:
  raise a csr_service error if it cannot be used; ``UnavailableError`` means "retry", anything
  else fails the start) and ``stop()`` (release clients, watches, threads; idempotent).
- :class:`HealthReporter`: ``health()`` for ``/readyz``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from csr_service.common.lifecycle import Lifecycle

__all__ = [
    "HealthReporter",
    "IssuedChain",
    "Issuer",
    "IssuerAbilities",
    "RootsListener",
    "RootsProvider",
    "RootsWatcher",
    "SigningCAInfo",
    "SigningRequest",
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
    #: Kubernetes key-usage names the certificate is for (a Kubernetes CSR's ``spec.usages``, e.g.
    #: ``server auth`` without ``client auth`` for istiod's own certificate); empty: the usual
    #: ``digital signature, key encipherment, server auth, client auth``. See item 8.
    usages: Sequence[str] = ()
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


#: Called with the new roots; its return value is ignored.
RootsListener = Callable[[Sequence[x509.Certificate]], object]


@runtime_checkable
class RootsWatcher(Protocol):
    """The issuer notices when its roots change (e.g. a rotated local CA)."""

    def add_roots_listener(self, listener: RootsListener) -> None:
        """Call ``listener(roots)`` after every change of the roots, on the event loop."""
        ...


@runtime_checkable
class HealthReporter(Protocol):
    """The issuer can say, without blocking, whether it is usable (for /readyz)."""

    def health(self) -> tuple[bool, str]:
        """(usable, human-readable reason). Must be cheap: never call the backend here."""
        ...


@dataclass(frozen=True, slots=True)
class IssuerAbilities:
    """An issuer with its optional abilities looked up once (when it becomes active).

    Runtime protocol checks cost ~10 µs each; the request path reads these fields instead.
    """

    issuer: Issuer
    name: str
    checks_csr_signature: bool = False
    signs_in_process: bool = False
    roots_are_configuration: bool = False
    roots: RootsProvider | None = None
    roots_watcher: RootsWatcher | None = None
    signing_ca: SigningCAInfo | None = None
    lifecycle: Lifecycle | None = None
    health: HealthReporter | None = None

    @classmethod
    def of(cls, issuer: Issuer) -> IssuerAbilities:
        """Resolve what ``issuer`` can do (see the module docstring)."""
        return cls(
            issuer=issuer,
            name=issuer.name,
            checks_csr_signature=getattr(issuer, "checks_csr_signature", False) is True,
            signs_in_process=getattr(issuer, "signs_in_process", False) is True,
            roots_are_configuration=getattr(issuer, "roots_are_configuration", False) is True,
            roots=issuer if isinstance(issuer, RootsProvider) else None,
            roots_watcher=issuer if isinstance(issuer, RootsWatcher) else None,
            signing_ca=issuer if isinstance(issuer, SigningCAInfo) else None,
            lifecycle=issuer if isinstance(issuer, Lifecycle) else None,
            health=issuer if isinstance(issuer, HealthReporter) else None,
        )

    def signing_ca_not_after(self) -> datetime | None:
        """NotAfter of the signing CA when the issuer knows it."""
        return self.signing_ca.signing_ca_not_after() if self.signing_ca is not None else None
