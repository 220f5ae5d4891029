"""Options of the local CA issuer (no heavy imports here; see csr_service.issuers)."""

from datetime import timedelta

from csr_service.options import Option

OPTIONS = [
    Option(
        "local-ca-dir",
        "Directory holding the signing CA: Istio's cacerts layout (ca-cert.pem, ca-key.pem, "
        "cert-chain.pem, root-cert.pem) or a kubernetes.io/tls Secret mount (tls.crt, tls.key, ca.crt).",
        "",
        group="local",
        kind="path",
        metavar="DIR",
    ),
    Option(
        "local-ca-reload-interval",
        "How often to check the CA files for changes; a bad new CA is refused and the last good one kept.",
        timedelta(seconds=10),
        group="local",
        kind="duration",
    ),
]
