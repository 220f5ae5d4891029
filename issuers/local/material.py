"""Loading and checking CA material: the certificate and key the local issuer signs with.

Two directory layouts are accepted, the two operators already have:

- Istio's ``cacerts`` (what istiod's plug-in CA reads): ``ca-cert.pem`` (signing cert),
  ``ca-key.pem``, ``cert-chain.pem`` (signing cert + intermediates, possibly the root),
  ``root-cert.pem`` (one or more roots);
- a ``kubernetes.io/tls`` Secret mount (what cert-manager writes): ``tls.crt`` (signing cert,
  optionally followed by intermediates), ``tls.key``, ``ca.crt`` (roots).

A self-signed signing certificate may omit the chain and root files: it is its own root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from csr_service.pki.chain import ChainError, build_path, fingerprint, is_self_signed
from csr_service.pki.keys import PrivateKey
from csr_service.pki.pem import load_private_key, parse_certs, same_public_key

__all__ = ["CAMaterial", "CAMaterialError", "load_ca_dir", "load_ca_pem"]

CACERTS_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
TLS_FILES = ("tls.crt", "tls.key", "ca.crt")


class CAMaterialError(ValueError):
    """The CA files are missing, malformed or inconsistent. The message says which and why."""


@dataclass(frozen=True, slots=True)
class CAMaterial:
    """A checked signing CA: cert + key, the intermediates above it, and the roots."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    #: CA certificates between ``cert`` and a root, ``cert``'s issuer first (no roots).
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    source: str
    #: Hash of the input bytes: a reload with identical content is a no-op.
    digest: str

    def __post_init__(self) -> None:
        # Whichever way a CAMaterial is made, its key signs for its certificate: the local
        # issuer's signs_in_process claim (issuer contract item 8) rests on this.
        if not same_public_key(self.cert, self.key):
            raise CAMaterialError(f"{self.source}: the CA key does not match the CA certificate")

    @property
    def not_after(self) -> datetime:
        """The earliest NotAfter along the signing path: nothing may be issued past it."""
        return min(c.not_valid_after_utc for c in (self.cert, *self.intermediates))

    def describe(self) -> str:
        return (
            f"CA {self.cert.subject.rfc4514_string()!r} from {self.source}, valid until "
            f"{self.cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, {len(self.intermediates)} intermediate(s), "
            f"roots {', '.join(fingerprint(r)[:16] for r in self.roots)}"
        )


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CAMaterialError(f"cannot read {path}: {exc.strerror}") from exc


def load_ca_dir(directory: str | Path, *, now: datetime | None = None) -> CAMaterial:
    """Load and check the CA in ``directory`` (either layout); raise CAMaterialError."""
    d = Path(directory)
    if not d.is_dir():
        raise CAMaterialError(f"{d} is not a directory")
    if (d / "ca-cert.pem").exists() or (d / "ca-key.pem").exists():
        cert, key, chain, roots = (_read(d / n) for n in CACERTS_FILES)
        names = CACERTS_FILES
    elif (d / "tls.crt").exists() or (d / "tls.key").exists():
        cert, key, roots = (_read(d / n) for n in TLS_FILES)
        chain = None
        names = ("tls.crt", "tls.key", "", "ca.crt")
    else:
        raise CAMaterialError(
            f"{d} holds neither Istio's cacerts layout ({', '.join(CACERTS_FILES)}) nor a TLS Secret "
            f"layout ({', '.join(TLS_FILES)})"
        )
    if cert is None:
        raise CAMaterialError(f"{d / names[0]} is missing")
    if key is None:
        raise CAMaterialError(f"{d / names[1]} is missing")
    return load_ca_pem(cert, key, chain, roots, source=str(d), now=now)


def load_ca_pem(
    cert_pem: bytes,
    key_pem: bytes,
    chain_pem: bytes | None,
    roots_pem: bytes | None,
    *,
    source: str,
    now: datetime | None = None,
) -> CAMaterial:
    """Build CA material from PEM bytes (files, a Secret, Vault KV) and check it.

    Checks: the key matches the certificate; the certificate is a CA allowed to sign
    certificates; it is within its validity period; it chains, through the given
    intermediates, to one of the roots.
    """
    now = now or datetime.now(UTC)
    digest = hashlib.sha256(b"\0".join(x or b"" for x in (cert_pem, key_pem, chain_pem, roots_pem))).hexdigest()
    try:
        certs = parse_certs(cert_pem, what=f"{source}: CA certificate")
        key = load_private_key(key_pem, what=f"{source}: CA key")
        extra = parse_certs(chain_pem, what=f"{source}: certificate chain") if chain_pem and chain_pem.strip() else []
        roots = parse_certs(roots_pem, what=f"{source}: root certificates") if roots_pem and roots_pem.strip() else []
    except ValueError as exc:
        raise CAMaterialError(str(exc)) from exc
    cert = certs[0]
    pool = [c for c in (*certs[1:], *extra) if c != cert]
    if not roots:
        if not is_self_signed(cert):
            raise CAMaterialError(
                f"{source}: no root certificates given (root-cert.pem / ca.crt) "
                "and the CA certificate is not self-signed"
            )
        roots = [cert]
    _check_ca(cert, key, source, now)
    try:
        path = build_path(cert, pool, roots, now=now)
    except ChainError as exc:
        raise CAMaterialError(f"{source}: the CA certificate does not chain to the roots: {exc}") from exc
    intermediates = tuple(c for c in path[1:-1])
    return CAMaterial(
        cert=cert,
        key=key,
        intermediates=intermediates,
        roots=tuple(_dedupe(roots)),
        source=source,
        digest=digest,
    )


def _check_ca(cert: x509.Certificate, key: PrivateKey, source: str, now: datetime) -> None:
    if not same_public_key(cert, key):
        raise CAMaterialError(f"{source}: the CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAMaterialError(f"{source}: the CA certificate is not a CA (BasicConstraints CA:TRUE missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CAMaterialError(f"{source}: the CA certificate's KeyUsage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass
    if now < cert.not_valid_before_utc:
        raise CAMaterialError(f"{source}: the CA certificate is not valid before {cert.not_valid_before_utc}")
    if now >= cert.not_valid_after_utc:
        raise CAMaterialError(f"{source}: the CA certificate expired at {cert.not_valid_after_utc}")


def _dedupe(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[str] = set()
    out = []
    for c in certs:
        fp = fingerprint(c)
        if fp not in seen:
            seen.add(fp)
            out.append(c)
    return out
