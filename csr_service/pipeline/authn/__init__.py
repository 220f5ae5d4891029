"""The built-in authenticators (plugins of the ``csr_service.authenticators`` group).

- ``jwt``: the token's signature checked offline against a JWKS file (:mod:`.jwt`);
- ``tokenreview``: the apiserver asked about every token, cached and coalesced (:mod:`.tokenreview`);
- ``jwks``: the apiserver's (or an OIDC issuer's) published keys, refreshed (:mod:`.jwks`);
- ``client-cert``: the caller's TLS client certificate, verified against the trust bundle
  (:mod:`.clientcert`).

``--authenticators`` orders several of them; the first that recognises the call's credential
decides (:mod:`.chain`).

The contract is in :mod:`csr_service.plugins.authenticator`. This module is cheap to import:
the implementations are imported only when selected.
"""

import itertools
from collections.abc import Sequence

from csr_service.common.options import Option
from csr_service.pipeline.authn.options import (
    AUDIENCE_OPTIONS,
    JWKS_OPTIONS,
    JWT_CLAIM_OPTIONS,
    JWT_KEY_OPTIONS,
    TOKENREVIEW_OPTIONS,
)
from csr_service.plugins.registry import Plugin

__all__ = ["CLIENT_CERT", "JWKS", "JWT", "TOKENREVIEW"]


def _builtin(name: str, settings: str, summary: str, *options: Sequence[Option]) -> Plugin:
    """A built-in authenticator: its implementation is the module of the same name here, its
    settings a class in ``settings.py`` (validated at start-up)."""
    return Plugin(
        name,
        summary,
        tuple(itertools.chain(*options)),
        f"csr_service.pipeline.authn.{name}:create",
        validator=f"csr_service.pipeline.authn.settings:{settings}.from_values",
    )


JWT = _builtin(
    "jwt",
    "JWTSettings",
    "the token's signature checked against a JWKS file (--jwt-jwks-file)",
    AUDIENCE_OPTIONS,
    JWT_KEY_OPTIONS,
    JWT_CLAIM_OPTIONS,
)
TOKENREVIEW = _builtin(
    "tokenreview",
    "TokenReviewSettings",
    "the apiserver reviews every token (the in-cluster choice; cached)",
    AUDIENCE_OPTIONS,
    TOKENREVIEW_OPTIONS,
)
JWKS = _builtin(
    "jwks",
    "JWKSSettings",
    "the apiserver's published keys (or --jwks-url), refreshed",
    AUDIENCE_OPTIONS,
    JWT_CLAIM_OPTIONS,
    JWKS_OPTIONS,
)
CLIENT_CERT = Plugin(
    "client-cert",
    "the caller's TLS client certificate (needs --client-cert-grpc-listen): renew an identity held",
    (),
    "csr_service.pipeline.authn.clientcert:create",
)
