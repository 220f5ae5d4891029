"""The built-in authenticators (plugins of the ``csr_service.authenticators`` group).

- ``jwt``: the token's signature checked offline against a JWKS file (:mod:`.jwt`);
- ``tokenreview``: the apiserver asked about every token, cached and coalesced (:mod:`.tokenreview`);
- ``jwks``: the apiserver's (or an OIDC issuer's) published keys, refreshed (:mod:`.jwks`).

The contract is in :mod:`csr_service.plugins.authenticator`. This module is cheap to import:
the implementations are imported only when selected.
"""

from csr_service.pipeline.authn.options import (
    AUDIENCE_OPTIONS,
    JWKS_OPTIONS,
    JWT_CLAIM_OPTIONS,
    JWT_KEY_OPTIONS,
    TOKENREVIEW_OPTIONS,
)
from csr_service.plugins.registry import Plugin

__all__ = ["JWKS", "JWT", "TOKENREVIEW"]

JWT = Plugin(
    name="jwt",
    summary="the token's signature checked against a JWKS file (--jwt-jwks-file)",
    options=(*AUDIENCE_OPTIONS, *JWT_KEY_OPTIONS, *JWT_CLAIM_OPTIONS),
    factory="csr_service.pipeline.authn.jwt:create",
    validator="csr_service.pipeline.authn.options:validate",
)
TOKENREVIEW = Plugin(
    name="tokenreview",
    summary="the apiserver reviews every token (the in-cluster choice; cached)",
    options=(*AUDIENCE_OPTIONS, *TOKENREVIEW_OPTIONS),
    factory="csr_service.pipeline.authn.tokenreview:create",
    validator="csr_service.pipeline.authn.options:validate",
)
JWKS = Plugin(
    name="jwks",
    summary="the apiserver's published keys (or --jwks-url), refreshed",
    options=(*AUDIENCE_OPTIONS, *JWT_CLAIM_OPTIONS, *JWKS_OPTIONS),
    factory="csr_service.pipeline.authn.jwks:create",
    validator="csr_service.pipeline.authn.options:validate",
)
