"""What a pipeline step knows about the call: metadata, peer, TLS client certificate, request id."""

from __future__ import annotations

import contextvars
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["REQUEST_ID", "RequestContext", "new_request_id"]

#: The current request id, picked up by the log formatter for every line about a request.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """gRPC call facts, transport-independent. Metadata keys are lower-case."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    peer: str = ""
    request_id: str = field(default_factory=new_request_id)
    #: The TLS client certificate chain the caller presented (PEM, leaf first), empty if none.
    #: Only the listener of ``--client-cert-grpc-listen`` asks for one; gRPC core has already
    #: checked it chains to the trust bundle, and the ``client-cert`` authenticator checks again.
    peer_certificates: tuple[bytes, ...] = ()

    def bearer_token(self) -> str | None:
        """The token from ``authorization: Bearer <token>``, or None if absent/malformed."""
        value = self.metadata.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()
