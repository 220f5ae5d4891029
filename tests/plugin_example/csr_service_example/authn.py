"""An authenticator written against csr-service's public plugin surface only (a toy: do not use)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csr_service.common.errors import AuthenticationError, ConfigError
from csr_service.common.identity import SpiffeId
from csr_service.plugins.authenticator import Caller, RequestContext
from csr_service.plugins.runtime import Runtime


class StaticAuthenticator:
    name = "example-static"

    def __init__(self, tokens: dict[str, tuple[str, str]], trust_domain: str) -> None:
        self._tokens = tokens
        self._trust_domain = trust_domain

    async def authenticate(self, ctx: RequestContext) -> Caller:
        token = ctx.bearer_token() or ""
        for known, (ns, sa) in self._tokens.items():
            if hmac.compare_digest(known, token):
                return Caller(identity=SpiffeId(self._trust_domain, ns, sa), authenticator=self.name)
        raise AuthenticationError("authentication failed: unknown token")


def create(values: Mapping[str, Any], runtime: Runtime) -> StaticAuthenticator:
    path = values["example-tokens-file"]
    if not path:
        raise ConfigError("--example-tokens-file: required with --authenticator example-static")
    tokens = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, ns, sa = line.split()
            tokens[token] = (ns, sa)
    return StaticAuthenticator(tokens, runtime.trust_domain)
