"""The ``clusterid`` metadata must be empty or name a cluster we serve (as istiod checks)."""

from __future__ import annotations

from collections.abc import Collection

from csr_service.common.errors import AuthenticationError
from csr_service.common.request import RequestContext

__all__ = ["check_cluster_id"]


def check_cluster_id(ctx: RequestContext, accepted: Collection[str]) -> None:
    """Raise AuthenticationError (UNAUTHENTICATED, like istiod) for a foreign cluster id."""
    claimed = ctx.metadata.get("clusterid", "")
    if claimed and claimed not in accepted:
        raise AuthenticationError(
            f"client claims to be in cluster {claimed[:64]!r}, which this CA does not serve",
            detail=f"clusterid {claimed[:64]!r} not in {sorted(accepted)}",
        )
