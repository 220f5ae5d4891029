"""Caller authentication. Pluggable: anything implementing :class:`Authenticator`.

Today: :mod:`.jwt` (signature checked against a JWKS). The Kubernetes TokenReview
authenticator implements the same protocol and slots in by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from csr_service.identity import SpiffeId
from csr_service.pipeline.context import RequestContext

__all__ = ["Authenticator", "Caller"]


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
