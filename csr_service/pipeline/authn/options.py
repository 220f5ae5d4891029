"""Options of the built-in authenticators (cheap to import: no JWT or Kubernetes libraries).

``--token-audiences`` is read by all three; ``--jwt-issuer`` and ``--jwt-leeway`` by ``jwt``
and ``jwks``. Each authenticator declares the full list it reads (see ``__init__``).
"""

from datetime import timedelta

from csr_service.common.options import Option

__all__ = [
    "AUDIENCE_OPTIONS",
    "JWKS_OPTIONS",
    "JWT_CLAIM_OPTIONS",
    "JWT_KEY_OPTIONS",
    "TOKENREVIEW_OPTIONS",
]

AUDIENCE_OPTIONS = [
    Option(
        "token-audiences",
        "Audiences accepted in caller tokens (Istio's TOKEN_AUDIENCES).",
        ("istio-ca",),
        group="auth",
        kind="list",
    ),
]

JWT_KEY_OPTIONS = [
    Option(
        "jwt-jwks-file",
        "JWKS file with the public keys that sign caller tokens.",
        "",
        group="auth",
        kind="path",
    ),
]

JWT_CLAIM_OPTIONS = [
    Option("jwt-issuer", "Required iss claim of caller tokens; empty: not checked.", "", group="auth"),
    Option(
        "jwt-leeway",
        "Clock-skew allowance for exp/nbf/iat.",
        timedelta(seconds=30),
        group="auth",
        kind="duration",
    ),
]

TOKENREVIEW_OPTIONS = [
    Option(
        "tokenreview-cache-ttl",
        "--authenticator tokenreview: how long an accepted token is remembered (never past its exp).",
        timedelta(minutes=5),
        group="auth",
        kind="duration",
    ),
    Option(
        "tokenreview-cache-size",
        "--authenticator tokenreview: most tokens remembered (least recently used are dropped).",
        10000,
        group="auth",
        kind="int",
    ),
]

JWKS_OPTIONS = [
    Option(
        "jwks-url",
        "--authenticator jwks: OIDC issuer URL whose /.well-known/openid-configuration names the keys; "
        "empty: the apiserver of --kubeconfig / in-cluster config.",
        "",
        group="auth",
    ),
    Option(
        "jwks-ca-file",
        "--authenticator jwks: CA bundle for --jwks-url; empty: the system CAs.",
        "",
        group="auth",
        kind="path",
    ),
    Option(
        "jwks-refresh-interval",
        "--authenticator jwks: how often the key set is re-read (also re-read on an unknown key id).",
        timedelta(minutes=5),
        group="auth",
        kind="duration",
    ),
]
