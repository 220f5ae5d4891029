"""Example plugins: the light module the entry points name (no heavy imports here)."""

from datetime import timedelta

from csr_service.common.options import Option
from csr_service.plugins.registry import Plugin

__all__ = ["AUTHENTICATOR", "ISSUER"]

ISSUER = Plugin(
    name="example",
    summary="signs with a CA keypair in a directory (an example plugin)",
    options=(
        Option("example-ca-dir", "Directory with ca-cert.pem, ca-key.pem and root-cert.pem.", "", group="example"),
        Option("example-max-ttl", "Longest certificate signed.", timedelta(hours=1), group="example", kind="duration"),
    ),
    factory="csr_service_example.issuer:create",
    validator="csr_service_example.issuer:validate",
)

AUTHENTICATOR = Plugin(
    name="example-static",
    summary="tokens listed in a file, one 'token namespace serviceaccount' per line (an example plugin)",
    options=(
        Option("example-tokens-file", "File of 'token namespace serviceaccount' lines.", "", group="auth", kind="path"),
    ),
    factory="csr_service_example.authn:create",
)
