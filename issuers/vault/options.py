"""Options of the Vault / OpenBao PKI issuer (no heavy imports here).

The connection and login options (``CONNECTION_OPTIONS``) live in
:mod:`issuers.vault_connection.options`: the local issuer's Vault-KV CA source reads them too.
"""

from csr_service.common.options import Option
from issuers.vault_connection.options import CONNECTION_OPTIONS

__all__ = ["CONNECTION_OPTIONS", "ISSUER_OPTIONS", "OPTIONS"]

_G = "vault"

ISSUER_OPTIONS = [
    Option("vault-mount", "Mount path of the PKI secrets engine.", "pki", group=_G),
    Option("vault-role", "PKI role that signs workload certificates (<mount>/sign/<role>).", "", group=_G),
    Option(
        "vault-serving-role",
        "PKI role for csr-service's own serving certificate (DNS/IP names); empty: --vault-role.",
        "",
        group=_G,
    ),
    Option(
        "vault-issuer-ref",
        "Pin a PKI issuer (name or id): sign at <mount>/issuer/<ref>/sign/<role>; empty: mount default.",
        "",
        group=_G,
    ),
    Option(
        "vault-sign-verbatim",
        "Sign with sign-verbatim instead of sign. DANGER: bypasses the role's name policy; "
        "csr-service's own CSR checks are then the only ones.",
        False,
        group=_G,
        kind="bool",
    ),
    Option(
        "vault-roots-from-vault",
        "Trust the roots Vault reports (trust on first use) instead of only --root-ca-file.",
        False,
        group=_G,
        kind="bool",
    ),
    Option(
        "vault-root-fingerprints",
        "SHA-256 fingerprints (hex, colons allowed) the roots fetched from Vault must match.",
        (),
        group=_G,
        kind="list",
    ),
]

OPTIONS = [*CONNECTION_OPTIONS, *ISSUER_OPTIONS]
