"""The local CA issuer: signs with a CA keypair held by csr-service itself (``--issuer local``)."""

from csr_service.plugins.registry import Plugin
from issuers.local.options import OPTIONS
from issuers.vault_connection.options import CONNECTION_OPTIONS

__all__ = ["PLUGIN"]

PLUGIN = Plugin(
    name="local",
    summary="a CA certificate and key from a directory (Istio cacerts or kubernetes.io/tls layout) or Vault KV",
    # The Vault-KV CA source logs in with the same vault-* connection options as the Vault issuer.
    options=(*OPTIONS, *CONNECTION_OPTIONS),
    factory="issuers.local.issuer:create",
)
