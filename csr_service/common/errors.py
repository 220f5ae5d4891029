"""The one error hierarchy of csr-service.

Every failure a caller can see is one of these. Each class carries the gRPC status it maps
to (the single table lives in :data:`STATUS_TABLE`, applied at the gRPC boundary by
``csr_service.transport.status``). ``public`` is the short message a workload sees; ``detail``
goes to the log only (with the request id) and may name backends, paths and reasons, but
never keys, tokens or whole CSRs::

    CSRServiceError
    ├── AuthenticationError        UNAUTHENTICATED   token missing/invalid, CSR identity ≠ caller
    ├── InvalidRequestError        INVALID_ARGUMENT  bad or forbidden CSR, bad metadata
    ├── PermissionDeniedError      PERMISSION_DENIED request denied (cert-manager), impersonation refused
    ├── FailedPreconditionError    FAILED_PRECONDITION no issuer, CA expired, backend refuses a valid CSR
    │   └── MissingUsageError                         the issued leaf lacks a key usage (backend misconfigured)
    ├── UnavailableError           UNAVAILABLE       backend down, sealed, connection errors (retryable)
    ├── ResourceExhaustedError     RESOURCE_EXHAUSTED backend 429, our own concurrency limit (retryable)
    │   └── LoadShedError                             refused by our own limits before any work
    ├── DeadlineExceededError      DEADLINE_EXCEEDED not signed in time (retryable)
    └── InternalError              INTERNAL          issuer output unparseable or not verifying
"""

from __future__ import annotations

import grpc

__all__ = [
    "STATUS_TABLE",
    "AuthenticationError",
    "CSRServiceError",
    "ConfigError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidRequestError",
    "LoadShedError",
    "MissingUsageError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnavailableError",
]


class ConfigError(Exception):
    """Invalid configuration, raised at start-up (never reaches a client). Names the flag."""


class CSRServiceError(Exception):
    """Base of every error a caller can receive.

    Args:
        public: short, generic text sent to the workload.
        detail: the full story for the log (defaults to ``public``).
    """

    def __init__(self, public: str, *, detail: str | None = None) -> None:
        super().__init__(public)
        self.public = public
        self.detail = detail if detail is not None else public

    def __str__(self) -> str:
        return self.detail


class AuthenticationError(CSRServiceError):
    """The caller could not be authenticated, or asked for an identity that is not its own."""


class InvalidRequestError(CSRServiceError):
    """The request (CSR, duration, metadata) is malformed or asks for something forbidden."""


class PermissionDeniedError(CSRServiceError):
    """The caller is known but not allowed this (a denied request, refused impersonation)."""


class FailedPreconditionError(CSRServiceError):
    """The system is not in a state to serve this request until an operator acts."""


class MissingUsageError(FailedPreconditionError):
    """The issuer returned a leaf without a key usage Istio's CA puts in: its backend decides
    usages on its own (a Vault role's ``server_flag``) and is misconfigured. Never returned."""


class UnavailableError(CSRServiceError):
    """A backend is temporarily unreachable; the client should retry."""


class ResourceExhaustedError(CSRServiceError):
    """Rate-limited by a backend or by our own concurrency limit; retry later."""


class LoadShedError(ResourceExhaustedError):
    """Refused by csr-service's own load limits before any work was done; retry later.

    ``reason`` names the limit (``concurrency``: ``--max-concurrent-requests``,
    ``identity_rate``: ``--per-identity-rate``); it labels the shed-requests metric. Sheds are
    counted and summarised in the log, not logged one by one: under overload they come by the
    thousand per second.
    """

    def __init__(self, public: str, *, reason: str, detail: str | None = None) -> None:
        super().__init__(public, detail=detail)
        self.reason = reason


class DeadlineExceededError(CSRServiceError):
    """The request was not completed within the server-side deadline."""


class InternalError(CSRServiceError):
    """Something produced output we cannot trust (e.g. an issued chain that does not verify)."""


#: The single table from error class to gRPC status code. Looked up along the MRO, so
#: backend-specific subclasses inherit their parent's code.
STATUS_TABLE: dict[type[CSRServiceError], grpc.StatusCode] = {
    AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
}


def status_code_for(exc: CSRServiceError) -> grpc.StatusCode:
    """Return the gRPC status for an error, walking its class hierarchy."""
    for klass in type(exc).__mro__:
        code = STATUS_TABLE.get(klass)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
