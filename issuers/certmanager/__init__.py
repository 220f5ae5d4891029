"""The cert-manager issuer: signs through ``cert-manager.io/v1`` CertificateRequests (``--issuer cert-manager``)."""

from csr_service.plugins.registry import Plugin
from issuers.certmanager.options import OPTIONS

__all__ = ["PLUGIN"]

PLUGIN = Plugin(
    name="cert-manager",
    summary="cert-manager CertificateRequests signed by an Issuer, ClusterIssuer or external issuer",
    options=tuple(OPTIONS),
    factory="issuers.certmanager.issuer:create",
)
