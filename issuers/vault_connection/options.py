"""Options of the Vault / OpenBao connection and login (no heavy imports here).

Declared once and read by two issuer plugins: the Vault PKI issuer and the local issuer's
Vault-KV CA source, which reads the CA keypair through the same client.
"""

from datetime import timedelta

from csr_service.common.options import Option

__all__ = ["CONNECTION_OPTIONS"]

_G = "vault"

CONNECTION_OPTIONS = [
    Option(
        "vault-address",
        "Vault/OpenBao address, e.g. https://vault.vault.svc:8200.",
        "",
        group=_G,
        metavar="URL",
    ),
    Option("vault-namespace", "Vault Enterprise namespace (X-Vault-Namespace); empty: none.", "", group=_G),
    Option(
        "vault-ca-bundle",
        "PEM CA bundle to verify Vault's TLS certificate; empty: the system trust store.",
        "",
        group=_G,
        kind="path",
    ),
    Option(
        "vault-client-cert",
        "PEM client certificate for mutual TLS to Vault (optional).",
        "",
        group=_G,
        kind="path",
    ),
    Option("vault-client-key", "PEM key of --vault-client-cert.", "", group=_G, kind="path"),
    Option(
        "vault-timeout",
        "Timeout of one HTTP request to Vault.",
        timedelta(seconds=5),
        group=_G,
        kind="duration",
    ),
    Option(
        "vault-max-connections",
        "Concurrent requests to Vault (pooled keep-alive connections): a sign is one HTTP round trip.",
        64,
        group=_G,
        kind="int",
    ),
    Option("vault-auth", "How to log in to Vault: token, kubernetes or approle.", "token", group=_G),
    Option(
        "vault-token-file",
        "File holding a Vault token (--vault-auth token); re-read when Vault refuses the token.",
        "",
        group=_G,
        kind="path",
    ),
    Option("vault-kubernetes-role", "Vault role for kubernetes auth (--vault-auth kubernetes).", "", group=_G),
    Option("vault-kubernetes-mount", "Mount path of Vault's kubernetes auth method.", "kubernetes", group=_G),
    Option(
        "vault-kubernetes-token-file",
        "Service-account token presented at kubernetes login (re-read at every login: it is rotated).",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        group=_G,
        kind="path",
    ),
    Option("vault-approle-mount", "Mount path of Vault's approle auth method.", "approle", group=_G),
    Option("vault-approle-role-id-file", "File holding the approle role_id.", "", group=_G, kind="path"),
    Option(
        "vault-approle-secret-id-file",
        "File holding the approle secret_id (re-read at every login).",
        "",
        group=_G,
        kind="path",
    ),
]
