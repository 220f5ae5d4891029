"""Caller authentication. Pluggable: anything implementing :class:`Authenticator`.

Today: :mod:`.jwt` (signature checked against a JWKS). The Kubernetes TokenReview
authenticator implements the same protocol and slots in by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from csr_service.identity import SpiffeId
from csr_service.pipeline.context import RequestContext

if TYPE_CHECKING:
    from csr_service.runtime import Runtime

__all__ = ["AUTHENTICATORS", "Authenticator", "Caller", "create_authenticator"]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated workload."""

    identity: SpiffeId
    pod_name: str | None = None
    pod_uid: str | None = None
    token_expires_at: datetime | None = None
    authenticator: str = ""

    @property
    def identities(self) -> tuple[str, ...]:
        return (self.identity.uri,)


@runtime_checkable
class Authenticator(Protocol):
    """Turns a call's credentials into a :class:`Caller` or raises AuthenticationError.

    Backend trouble (e.g. the apiserver is down) must raise UnavailableError instead, so
    the client retries rather than giving up.
    """

    name: str

    async def authenticate(self, ctx: RequestContext) -> Caller: ...


#: Authenticators by ``--authenticator`` name → "module:factory"; factory(runtime) -> Authenticator.
#: Imported lazily, like issuers.
AUTHENTICATORS: dict[str, str] = {
    "jwt": "csr_service.pipeline.authn.jwt:create",
    "tokenreview": "csr_service.pipeline.authn.tokenreview:create",
    "jwks": "csr_service.pipeline.authn.jwks:create",
}


def create_authenticator(name: str, runtime: Runtime) -> Authenticator:
    """Build the authenticator selected by ``--authenticator``."""
    from csr_service.errors import ConfigError

    target = AUTHENTICATORS.get(name)
    if target is None:
        raise ConfigError(f"--authenticator: unknown {name!r}; choose one of {', '.join(sorted(AUTHENTICATORS))}")
    module_name, _, func = target.partition(":")
    factory: Callable[[Runtime], Authenticator] = getattr(importlib.import_module(module_name), func)
    return factory(runtime)
