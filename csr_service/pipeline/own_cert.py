"""Certificates csr-service requests for itself or for Istio's control plane (not workloads).

Used for the gRPC serving certificate and for ``istiod-tls``. The request pipeline's
verifier is built for workload certificates (one SPIFFE URI); these carry DNS names and IPs,
so they are verified here with :func:`build_path` against the trust bundle, and their key
usages with the same rule as workloads' (:func:`~csr_service.pipeline.verify.missing_usages`)
for a TLS server: digitalSignature, serverAuth, not a CA. clientAuth and keyEncipherment are
not required, so a serving role without ``client_flag`` works.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csr_service.pipeline.verify import check_usages
from csr_service.pki.certs import build_csr
from csr_service.pki.chain import ChainError, build_path, certifies_key
from csr_service.pki.keys import KeyType, PrivateKey, generate_key
from csr_service.plugins.issuer import IssuedChain, Issuer, SigningRequest

__all__ = ["OwnCertificate", "issue_own_certificate"]


@dataclass(frozen=True, slots=True)
class OwnCertificate:
    key: PrivateKey
    issued: IssuedChain
    #: ``[leaf, intermediates..., root]`` as verified against the trust bundle.
    path: list[x509.Certificate]


async def issue_own_certificate(
    issuer: Issuer,
    roots: Sequence[x509.Certificate],
    *,
    ttl: timedelta,
    key_type: KeyType,
    purpose: str,
    request_id: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> OwnCertificate:
    """Generate a key, have ``issuer`` sign it, verify the chain against ``roots``.

    Raises the issuer's csr_service errors, FailedPreconditionError naming the issuer when
    the leaf lacks a usage a TLS server needs, or :class:`~csr_service.pki.chain.ChainError`
    when the result does not chain to ``roots``.
    """
    # RSA key generation takes tens of milliseconds: not on the event loop.
    key = await asyncio.to_thread(generate_key, key_type)
    csr = build_csr(key, uris=uris, dns_names=dns_names, ip_addresses=ip_addresses)
    issued = await issuer.sign(
        SigningRequest(
            csr=csr,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM),
            ttl=ttl,
            uris=tuple(uris),
            dns_names=tuple(dns_names),
            ip_addresses=tuple(ip_addresses),
            request_id=request_id,
            purpose=purpose,
        )
    )
    if not certifies_key(issued.leaf, key.public_key()):
        raise ChainError("the issued certificate carries another public key than the one generated for it")
    check_usages(issued.leaf, purpose, issuer)
    path = build_path(issued.leaf, list(issued.chain), roots, now=datetime.now(UTC))
    return OwnCertificate(key=key, issued=issued, path=path)
