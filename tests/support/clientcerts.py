"""Client certificates for the ``client-cert`` authenticator's tests: a good one and each bad kind.

Shared by the unit tests (the authenticator on its own) and the end-to-end tests (raw gRPC
against a real server), so both check the same list of refusals.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

from tests.support import pki

__all__ = ["BAD_KINDS", "ClientCert", "bad_client_cert", "good_client_cert"]

#: Each kind of certificate a caller must not authenticate with. For chain and time failures,
#: gRPC core's handshake already refuses it on the mTLS listener, and the value is the reason
#: gRPC core logs (OpenSSL's words); for the others the handshake passes, the authenticator
#: refuses the call with UNAUTHENTICATED, and the value is None.
BAD_KINDS: dict[str, str | None] = {
    "expired": "certificate has expired",
    "not-yet-valid": "certificate is not yet valid",
    "foreign-root": "unable to get local issuer certificate",
    "ca": None,
    "multi-uri": None,
    "non-spiffe": None,
    "other-trust-domain": None,
    "no-uri": None,
}


@dataclass(frozen=True)
class ClientCert:
    """A client certificate, its key, and the rest of the chain a client sends (PEM)."""

    cert: x509.Certificate
    key: pki.PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def cert_chain_pem(self) -> bytes:
        return pki.certs_pem(self.cert, *self.chain).encode()

    @property
    def key_pem(self) -> bytes:
        return pki.key_pem(self.key)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def good_client_cert(ca: pki.KeyPair, uri: str = "spiffe://cluster.local/ns/vm/sa/vm-workload") -> ClientCert:
    """A workload certificate of ``uri`` issued by ``ca``, as our CA issues them."""
    key = pki.new_key("ec256")
    return ClientCert(pki.sign_leaf(ca, key.public_key(), uris=[uri]), key)


def bad_client_cert(kind: str, ca: pki.KeyPair, uri: str = "spiffe://cluster.local/ns/vm/sa/vm-workload") -> ClientCert:
    """A client certificate of the bad ``kind`` (a key of :data:`BAD_KINDS`)."""
    key = pki.new_key("ec256")
    public = key.public_key()
    now = _now()
    if kind == "expired":
        cert = pki.sign_leaf(
            ca, public, uris=[uri], not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1)
        )
    elif kind == "not-yet-valid":
        cert = pki.sign_leaf(
            ca, public, uris=[uri], not_before=now + dt.timedelta(hours=1), not_after=now + dt.timedelta(hours=2)
        )
    elif kind == "foreign-root":
        cert = pki.sign_leaf(pki.make_ca("someone else's root"), public, uris=[uri])
    elif kind == "ca":
        intermediate = pki.make_ca("a CA, not a workload", parent=ca)
        return ClientCert(intermediate.cert, intermediate.key)
    elif kind == "multi-uri":
        cert = pki.sign_leaf(ca, public, uris=[uri, "spiffe://cluster.local/ns/vm/sa/other"])
    elif kind == "non-spiffe":
        cert = pki.sign_leaf(ca, public, uris=["https://vm.example.com/workload"])
    elif kind == "other-trust-domain":
        cert = pki.sign_leaf(ca, public, uris=["spiffe://other.example/ns/vm/sa/vm-workload"])
    elif kind == "no-uri":
        cert = pki.sign_leaf(ca, public, dns=["vm.example.com"])
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return ClientCert(cert, key)
