"""The cert-manager issuer: signs through ``cert-manager.io/v1`` CertificateRequests (``--issuer cert-manager``)."""

from csr_service.plugins.registry import Plugin
from issuers.certmanager.options import OPTIONS

__all__ = ["PLUGIN"]

#: name, summary, options, factory (imported only when --issuer cert-manager is chosen)
PLUGIN = Plugin(
    "cert-manager",
    "cert-manager CertificateRequests signed by an Issuer, ClusterIssuer or external issuer",
    tuple(OPTIONS),
    "issuers.certmanager.issuer:create",
)
