"""The Vault / OpenBao PKI issuer (``--issuer vault``); needs the ``vault`` extra (hvac)."""

from csr_service.plugins.registry import Plugin
from issuers.vault.options import OPTIONS

__all__ = ["PLUGIN"]

#: name, summary, options, factory (imported only when --issuer vault is chosen)
PLUGIN = Plugin(
    "vault",
    "a Vault / OpenBao PKI role (hvac; install the 'vault' extra)",
    tuple(OPTIONS),
    "issuers.vault.issuer:create",
)
