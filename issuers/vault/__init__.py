"""The Vault / OpenBao PKI issuer (``--issuer vault``); needs the ``vault`` extra (hvac)."""

from csr_service.plugins.registry import Plugin
from issuers.vault.options import OPTIONS

__all__ = ["PLUGIN"]

PLUGIN = Plugin(
    name="vault",
    summary="a Vault / OpenBao PKI role (hvac; install the 'vault' extra)",
    options=tuple(OPTIONS),
    factory="issuers.vault.issuer:create",
)
