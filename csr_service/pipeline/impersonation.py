"""ztunnel's ``ImpersonatedIdentity``: asking for another workload's identity on the same node.

The policy that can allow it (trusted node accounts, pod cache) belongs to the Kubernetes
integration; without one, any attempt is refused, never silently ignored.
"""

from __future__ import annotations

from typing import Protocol

from csr_service.common.errors import PermissionDeniedError
from csr_service.plugins.authenticator import Caller

__all__ = ["IMPERSONATION_KEY", "ImpersonationPolicy", "NoImpersonation"]

IMPERSONATION_KEY = "ImpersonatedIdentity"


class ImpersonationPolicy(Protocol):
    async def authorize(self, caller: Caller, requested: str) -> str:
        """Return the identity to certify, or raise PermissionDeniedError."""
        ...


class NoImpersonation:
    """Refuses every impersonation request."""

    async def authorize(self, caller: Caller, requested: str) -> str:
        raise PermissionDeniedError(
            "impersonation is not enabled on this CA",
            detail=f"{caller.identity} asked to impersonate {requested[:200]!r}; no trusted node accounts configured",
        )
