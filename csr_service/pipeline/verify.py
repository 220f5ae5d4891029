"""Verifying what an issuer returned before a workload sees it.

A backend bug or misconfiguration (wrong role, wrong intermediate, a TTL it ignored, key
usages it decided on its own) must never reach a workload as a certificate that peers will
reject: check the leaf against what we asked for and its chain against the trust bundle, and
answer INTERNAL otherwise. Key usages are the exception: a leaf without the usages Istio's
own CA puts in (see :func:`missing_usages`) is the backend's configuration speaking (a Vault
role with ``server_flag=false``: cert-manager's Vault issuer ignores ``spec.usages``), so it
is FAILED_PRECONDITION naming the issuer and what is missing, for the operator to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from csr_service.common.errors import InternalError, MissingUsageError
from csr_service.pki.chain import ChainError, build_path, certifies_key, signed_by
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import cert_to_pem
from csr_service.plugins.issuer import IssuedChain, Issuer, SigningRequest
from csr_service.trust.bundle import TrustSnapshot

__all__ = ["ChainVerifier", "check_usages", "missing_usages"]

#: Allowance for the time between deciding the TTL and the backend stamping NotAfter.
_TTL_SLACK = timedelta(seconds=30)
_CACHE_MAX = 64
#: How far in the future a backend's NotBefore may be (its clock vs ours, second rounding).
_NOT_BEFORE_SKEW = timedelta(minutes=1)


class ChainVerifier:
    """Verifies issued chains; caches the (rarely changing) CA part of each chain."""

    def __init__(self) -> None:
        # (chain certs, bundle version) -> (intermediates to return, their PEMs, valid-until)
        self._cache: dict[tuple[tuple[x509.Certificate, ...], int], tuple[tuple[str, ...], datetime]] = {}

    def verify(
        self,
        issued: IssuedChain,
        request: SigningRequest,
        trust: TrustSnapshot,
        *,
        now: datetime,
        issuer: Issuer | None = None,
        signed_in_process: bool = False,
    ) -> tuple[str, tuple[str, ...]]:
        """Return (leaf PEM, intermediate PEMs), or raise InternalError with the reason
        (MissingUsageError naming ``issuer`` when the leaf lacks a key usage).

        ``signed_in_process``: the issuer signed the leaf here with a key it checked against
        ``chain[0]`` (issuer contract item 8). The first leaf of each chain and trust bundle
        is still verified with the whole path; later ones skip only their signature check.
        """
        leaf = issued.leaf
        self._check_leaf(leaf, request, now)
        check_usages(leaf, request.purpose, issuer, request.public_key())  # _check_leaf: the leaf certifies it
        # The leaf's own validity is checked by _check_leaf (with clock-skew allowance); the
        # path check below is about the CAs, so it must not trip over a NotBefore of "now".
        chain = tuple(issued.chain)
        key = (chain, trust.version)
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            issuer_cert = chain[0] if chain else None
            if issuer_cert is not None:
                if signed_in_process:
                    if leaf.issuer == issuer_cert.subject:
                        return cert_to_pem(leaf), cached[0]
                elif signed_by(leaf, issuer_cert):
                    return cert_to_pem(leaf), cached[0]
        try:
            path = build_path(leaf, chain, trust.roots, now=now, check_leaf_time=False)
        except ChainError as exc:
            raise InternalError(
                "the issued certificate does not chain to the trust bundle",
                detail=f"issued chain rejected: {exc}",
            ) from exc
        intermediates = path[1:-1]
        pems = tuple(cert_to_pem(c) for c in intermediates)
        # Cache only when the leaf's issuer is chain[0]: then checking that one signature
        # per request re-establishes the whole path.
        if chain and path[1] == chain[0]:
            until = min(c.not_valid_after_utc for c in path[1:])
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (pems, until)
        return cert_to_pem(leaf), pems

    @staticmethod
    def _check_leaf(leaf: x509.Certificate, request: SigningRequest, now: datetime) -> None:
        if not certifies_key(leaf, request.public_key()):
            raise InternalError(
                "the issued certificate is invalid", detail="issued leaf has another public key than the CSR"
            )
        names = subject_alt_names(leaf)
        if not names.present:
            raise InternalError("the issued certificate is invalid", detail="issued leaf has no SAN")
        got_uris, got_dns, _ = names.sorted_names()
        if got_uris != sorted(request.uris) or (request.dns_names and got_dns != sorted(request.dns_names)):
            raise InternalError(
                "the issued certificate is invalid",
                detail=f"issued leaf names URIs={got_uris} DNS={got_dns}, asked URIs={list(request.uris)} "
                f"DNS={list(request.dns_names)}",
            )
        if request.purpose == "workload" and (got_dns or names.ip_addresses):
            raise InternalError("the issued certificate is invalid", detail="issued workload leaf carries DNS/IP SANs")
        if leaf.not_valid_after_utc > now + request.ttl + _TTL_SLACK:
            raise InternalError(
                "the issued certificate outlives the requested lifetime",
                detail=f"issuer returned NotAfter {leaf.not_valid_after_utc}, asked at most {now + request.ttl}",
            )
        # Backends that do not backdate (cert-manager stamps NotBefore = its "now", to the
        # second) can hand back a NotBefore just after our clock reading, or a little ahead on
        # a skewed clock; istio-agent's peers tolerate that the same way.
        if leaf.not_valid_before_utc > now + _NOT_BEFORE_SKEW:
            raise InternalError(
                "the issued certificate is not valid yet",
                detail=f"NotBefore {leaf.not_valid_before_utc} is more than {_NOT_BEFORE_SKEW} after {now}",
            )
        if leaf.not_valid_after_utc <= now:
            raise InternalError(
                "the issued certificate is already expired", detail=f"NotAfter {leaf.not_valid_after_utc}"
            )


#: What Istio's CA puts in every workload leaf (security/pkg/pki/util/generate_cert.go), and
#: what csr-service's own TLS certificates need (serving, istiod-tls: server side only, so a
#: serving role without client_flag is fine; key encipherment only matters to RSA key exchange,
#: which neither side negotiates).
_WORKLOAD_EKU = (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH), ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH))
_SERVER_EKU = (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),)


def missing_usages(
    leaf: x509.Certificate, purpose: str = "workload", public_key: CertificatePublicKeyTypes | None = None
) -> list[str]:
    """The usages ``leaf`` lacks for ``purpose`` ("workload", or "serving"/"istiod"), as names
    an operator can look up; empty when it has them all.

    Workload leaves must carry what Istio's own CA issues: KeyUsage digitalSignature (plus
    keyEncipherment for RSA keys), ExtKeyUsage serverAuth and clientAuth (every workload is
    both a TLS server and a client; ztunnel and strictly validating Envoys refuse a peer
    certificate without the one they need), and no CA flag. A missing KeyUsage or
    ExtKeyUsage extension counts as missing (istiod always writes both, so peers may rely on
    them); a missing BasicConstraints does not, since without it a certificate is not a CA
    (RFC 5280 4.2.1.9; Vault leaves it out unless its role sets
    ``basic_constraints_valid_for_non_ca``).

    ``public_key``: the leaf's key when the caller has it parsed already (the request's key,
    which the leaf was checked to certify), to save parsing it again on the hot path.
    """
    workload = purpose == "workload"
    ku: x509.KeyUsage | None = None
    eku: x509.ExtendedKeyUsage | None = None
    ca = False
    for ext in leaf.extensions:  # one pass: this runs on every request
        value = ext.value
        if isinstance(value, x509.KeyUsage):
            ku = value
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = value
        elif isinstance(value, x509.BasicConstraints):
            ca = value.ca
    missing = []
    if ku is None or not ku.digital_signature:
        missing.append("KeyUsage digitalSignature")
    if workload and (ku is None or not ku.key_encipherment):
        key = public_key if public_key is not None else leaf.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            missing.append("KeyUsage keyEncipherment (RSA key)")
    for name, oid in _WORKLOAD_EKU if workload else _SERVER_EKU:
        if eku is None or oid not in eku:
            missing.append(f"ExtKeyUsage {name}")
    if ca:
        missing.append("BasicConstraints CA:FALSE (the leaf is marked as a CA)")
    return missing


def check_usages(
    leaf: x509.Certificate,
    purpose: str,
    issuer: Issuer | None,
    public_key: CertificatePublicKeyTypes | None = None,
) -> None:
    """Raise MissingUsageError (FAILED_PRECONDITION) naming ``issuer`` and what is missing
    (:func:`missing_usages`)."""
    missing = missing_usages(leaf, purpose, public_key)
    if not missing:
        return
    name = issuer.name if issuer is not None else "the issuer"
    what = ", ".join(missing)
    raise MissingUsageError(
        f"issuer {name} returned a {purpose} certificate without {what}; the backend is misconfigured "
        "(e.g. a Vault role needs server_flag, client_flag and key_usage DigitalSignature,KeyEncipherment)",
        detail=f"issuer {name} returned a {purpose} certificate without {what} (signed by CA "
        f"{leaf.issuer.rfc4514_string()!r}, serial {leaf.serial_number:x}; {issuer!r}); refused, not handed out",
    )


def response_chain(leaf_pem: str, intermediates: Sequence[str], trust: TrustSnapshot) -> list[str]:
    """``[leaf, intermediates..., root bundle]``: istio-agent takes the LAST element as its roots."""
    return [leaf_pem, *intermediates, trust.pem]
