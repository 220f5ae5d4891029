"""Client-certificate authentication: a workload renews with the certificate it already holds.

istiod's ``ClientCertAuthenticator`` does this, and istio-agent uses it when it starts from a
provisioned certificate (``PROV_CERT``, e.g. a VM bootstrapped with a certificate) or has no
token. The caller presents its certificate in TLS on the listener of
``--client-cert-grpc-listen``; gRPC core has already verified the chain against the trust
bundle there (it refuses the handshake otherwise), and this authenticator checks again, in
Python, everything it relies on, because the identity it returns decides what is signed:

1. the chain leads to a root of the *current* trust bundle (a root rotated out stops working at
   once, without waiting for gRPC to reload its configuration), every CA on it is a CA;
2. every certificate on the path is within its validity;
3. the leaf is not a CA;
4. the leaf carries exactly one URI SAN, a SPIFFE id of Istio's form in our trust domain.

Accepted certificates are remembered (an LRU of :data:`CACHE_SIZE`, by the exact PEM the
connection presented, for as long as the trust bundle is the same one): a renewing agent keeps
its connection and sends the same certificate each time, and re-verifying the path costs
~0.1 ms per call. A remembered certificate is still checked for its validity window on every
call, and a new trust bundle (a rotation) empties the memory in effect.

The caller may then ask for that identity only: the pipeline checks the CSR against
``Caller.identities`` as for a token. Impersonation needs a pod-bound token, so a certificate
caller never impersonates.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from csr_service.common.errors import AuthenticationError, ConfigError
from csr_service.common.identity import SpiffeId, parse_spiffe_id
from csr_service.common.request import RequestContext
from csr_service.pki.chain import ChainError, build_path
from csr_service.plugins.authenticator import Caller

if TYPE_CHECKING:
    from csr_service.plugins.runtime import Runtime

__all__ = ["CACHE_SIZE", "ClientCertAuthenticator", "create"]

log = logging.getLogger(__name__)

#: Accepted certificates remembered (see the module docstring).
CACHE_SIZE = 4096


def _refuse(public: str, detail: str) -> AuthenticationError:
    return AuthenticationError(f"authentication failed: {public}", detail=f"client certificate refused: {detail}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _describe(cert: x509.Certificate) -> str:
    """Enough to find the certificate in an operator's inventory (never the key)."""
    return f"serial {cert.serial_number:x} subject {cert.subject.rfc4514_string()[:100]!r}"


class ClientCertAuthenticator:
    """Authenticates a caller by its verified TLS client certificate (see the module docstring)."""

    name = "client-cert"

    def __init__(
        self,
        *,
        trust_domain: str,
        roots: Callable[[], Sequence[x509.Certificate]],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._trust_domain = trust_domain
        self._roots = roots
        self._clock = clock
        # peer certificates -> (the roots they were checked against, the caller, valid from, until)
        self._accepted: OrderedDict[tuple[bytes, ...], tuple[object, Caller, datetime, datetime]] = OrderedDict()

    def recognizes(self, ctx: RequestContext) -> bool:
        """A client certificate was presented (only the mTLS listener asks for one)."""
        return bool(ctx.peer_certificates)

    async def authenticate(self, ctx: RequestContext) -> Caller:
        presented = ctx.peer_certificates
        if not presented:
            raise _refuse("no client certificate", "the caller presented no TLS client certificate")
        roots, now = self._roots(), self._clock()
        known = self._accepted.get(presented)
        if known is not None and known[0] is roots and known[2] <= now <= known[3]:
            self._accepted.move_to_end(presented)
            return known[1]
        try:
            certs = [x509.load_pem_x509_certificate(pem) for pem in presented]
        except ValueError as exc:
            raise _refuse("unreadable client certificate", f"cannot parse the TLS peer certificate: {exc}") from exc
        caller, path = self._verify(certs[0], certs[1:], roots, now)
        # Remembered for as long as every certificate on the path is valid.
        valid_from = max(c.not_valid_before_utc for c in path)
        valid_until = min(c.not_valid_after_utc for c in path)
        self._accepted[presented] = (roots, caller, valid_from, valid_until)
        while len(self._accepted) > CACHE_SIZE:
            self._accepted.popitem(last=False)
        return caller

    def check(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        roots: Sequence[x509.Certificate] | None = None,
        now: datetime | None = None,
    ) -> Caller:
        """The caller that ``leaf`` (with ``intermediates``) proves, or AuthenticationError."""
        now = now or self._clock()
        roots = self._roots() if roots is None else roots
        return self._verify(leaf, intermediates, roots, now)[0]

    def _verify(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        now: datetime,
    ) -> tuple[Caller, list[x509.Certificate]]:
        if now < leaf.not_valid_before_utc:
            raise _refuse(
                "client certificate not yet valid",
                f"{_describe(leaf)} is valid from {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
            )
        if now > leaf.not_valid_after_utc:
            raise _refuse(
                "client certificate expired",
                f"{_describe(leaf)} expired at {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            )
        if _is_ca(leaf):
            raise _refuse("a CA certificate is not a workload certificate", f"{_describe(leaf)} has CA:TRUE")
        uris = _uris(leaf)
        if len(uris) != 1:
            raise _refuse(
                "client certificate must carry exactly one URI SAN",
                f"{_describe(leaf)} has {len(uris)} URI SANs: {[u[:100] for u in uris[:5]]}",
            )
        identity = self._identity(uris[0], leaf)
        try:
            path = build_path(leaf, intermediates, roots, now=now)
        except ChainError as exc:
            raise _refuse("client certificate not issued by this mesh's CA", f"{_describe(leaf)}: {exc}") from exc
        not_ca = [c for c in path[1:] if not _is_ca(c)]
        if not_ca:
            raise _refuse(
                "client certificate not issued by this mesh's CA",
                f"{_describe(leaf)} is signed by {_describe(not_ca[0])}, which is not a CA",
            )
        return Caller(identity=identity, authenticator=self.name, token_expires_at=leaf.not_valid_after_utc), path

    def _identity(self, uri: str, leaf: x509.Certificate) -> SpiffeId:
        try:
            identity = parse_spiffe_id(uri)
        except ValueError as exc:
            raise _refuse("client certificate has no Istio SPIFFE identity", f"{_describe(leaf)}: {exc}") from exc
        if identity.trust_domain != self._trust_domain:
            raise _refuse(
                "client certificate is for another trust domain",
                f"{_describe(leaf)} names {identity} but the trust domain is {self._trust_domain}",
            )
        return identity


def create(values: Mapping[str, Any], runtime: Runtime) -> ClientCertAuthenticator:
    """``--authenticators client-cert,...``: verifies against the live trust bundle."""
    del values  # no options of its own
    roots = runtime.trust_roots
    if roots is None:
        raise ConfigError("--authenticators client-cert: no trust bundle to verify client certificates against")
    return ClientCertAuthenticator(trust_domain=runtime.trust_domain, roots=roots)
