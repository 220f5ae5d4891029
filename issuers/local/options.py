"""Options of the local CA issuer (no heavy imports here; see csr_service.plugins.registry)."""

from datetime import timedelta

from csr_service.common.options import Option

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
    # The CA keypair from a Vault KV secret instead of a directory (connection and login: the
    # vault-* options). The seed's layout: secret/data/pki/istiod, fields certificate/privateKey.
    Option(
        "local-ca-vault-kv-path",
        "Read the CA from this Vault KV secret (API path: with /data/ for KV v2, e.g. "
        "secret/data/pki/istiod) instead of --local-ca-dir; uses the --vault-* connection options.",
        "",
        group="local",
    ),
    Option(
        "local-ca-vault-kv-version",
        "KV engine version of --local-ca-vault-kv-path: 1 or 2.",
        2,
        group="local",
        kind="int",
    ),
    Option("local-ca-vault-cert-field", "KV field with the CA certificate (PEM).", "certificate", group="local"),
    Option("local-ca-vault-key-field", "KV field with the CA private key (PEM).", "privateKey", group="local"),
    Option("local-ca-vault-chain-field", "Optional KV field with intermediates (PEM).", "", group="local"),
    Option("local-ca-vault-root-field", "Optional KV field with the root(s) (PEM).", "", group="local"),
    Option(
        "local-ca-reload-interval",
        "How often to check the CA files for changes; a bad new CA is refused and the last good one kept.",
        timedelta(seconds=10),
        group="local",
        kind="duration",
    ),
]
