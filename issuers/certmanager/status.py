"""Reading a CertificateRequest's status: where it stands, and the error for each outcome.

Pure functions over the client's dicts, so every branch is unit-tested without a cluster.
cert-manager's conditions (BACKENDS.md): ``Approved``/``Denied`` (set by an approver),
``InvalidRequest``, and ``Ready`` with reason ``Pending`` (still working; its message says on
what), ``Failed`` (terminal), ``Denied`` (terminal) or ``Issued``.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csr_service.common.errors import (
    CSRServiceError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidRequestError,
    PermissionDeniedError,
    UnavailableError,
)

__all__ = ["Phase", "RequestState", "classify", "deleted_state", "failure_error", "timeout_error"]

#: Messages cert-manager puts on Ready=False/Pending when the *issuer* is the problem
#: (pkg/controller/certificaterequests/sync.go): missing, of no known type, or not Ready.
_ISSUER_PROBLEMS = ("Referenced ", "Missing issuer type")


class Phase(enum.Enum):
    """Where a request stands. The first two wait; the rest are terminal."""

    WAITING_FOR_APPROVAL = "waiting for approval"
    WAITING_FOR_ISSUER = "waiting for the issuer"
    ISSUED = "issued"
    DENIED = "denied"
    INVALID = "invalid"
    FAILED = "failed"
    DELETED = "deleted"

    @property
    def terminal(self) -> bool:
        return self not in (Phase.WAITING_FOR_APPROVAL, Phase.WAITING_FOR_ISSUER)


@dataclass(frozen=True, slots=True)
class RequestState:
    """A request's phase, with cert-manager's reason/message and, once issued, the PEMs."""

    phase: Phase
    reason: str = ""
    message: str = ""
    resource_version: str = ""
    #: ``status.certificate`` decoded (PEM: leaf + intermediates) once issued.
    certificate: bytes = b""
    #: ``status.ca`` decoded (PEM), best effort; may be an intermediate.
    ca: bytes = b""

    def describe(self) -> str:
        """``waiting for the issuer (Pending: Referenced issuer does not ...)`` for logs."""
        why = ": ".join(p for p in (self.reason, self.message) if p)
        return f"{self.phase.value} ({why})" if why else self.phase.value


def _condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or ():
        if isinstance(cond, Mapping) and cond.get("type") == ctype:
            return cond
    return None


def _is_true(cond: Mapping[str, Any] | None) -> bool:
    return cond is not None and cond.get("status") == "True"


def _decode(value: Any, what: str) -> bytes:
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InternalError(
            "the certificate authority returned an unreadable certificate", detail=f"{what} is not base64: {exc}"
        ) from exc


def classify(obj: Mapping[str, Any]) -> RequestState:
    """The state of a CertificateRequest object (as returned by the API, a dict)."""
    status: Mapping[str, Any] = obj.get("status") or {}
    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")

    def state(phase: Phase, cond: Mapping[str, Any] | None) -> RequestState:
        cond = cond or {}
        return RequestState(phase, str(cond.get("reason") or ""), str(cond.get("message") or ""), rv)

    denied = _condition(status, "Denied")
    if _is_true(denied):
        return state(Phase.DENIED, denied)
    invalid = _condition(status, "InvalidRequest")
    if _is_true(invalid):
        return state(Phase.INVALID, invalid)
    ready = _condition(status, "Ready")
    ready_reason = (ready or {}).get("reason")
    if ready is not None and ready.get("status") == "False" and ready_reason in ("Failed", "Denied"):
        return state(Phase.FAILED if ready_reason == "Failed" else Phase.DENIED, ready)
    certificate = _decode(status.get("certificate"), "status.certificate")
    if certificate:
        return RequestState(
            Phase.ISSUED,
            str((ready or {}).get("reason") or ""),
            resource_version=rv,
            certificate=certificate,
            ca=_decode(status.get("ca"), "status.ca"),
        )
    if _is_true(_condition(status, "Approved")):
        return state(Phase.WAITING_FOR_ISSUER, ready)
    return state(Phase.WAITING_FOR_APPROVAL, None)


def deleted_state() -> RequestState:
    """The state of a request that disappeared while we waited for it."""
    return RequestState(Phase.DELETED, message="the CertificateRequest was deleted before it was signed")


def failure_error(state: RequestState, *, name: str, issuer: str) -> CSRServiceError:
    """The error for a terminal, unsuccessful state (DENIED, INVALID, FAILED, DELETED)."""
    where = f"CertificateRequest {name} for {issuer}"
    why = f"{state.reason}: {state.message}" if state.reason else state.message
    if state.phase is Phase.DENIED:
        return PermissionDeniedError(
            "the certificate request was denied by the cluster's approval policy",
            detail=f"{where} was denied ({why})",
        )
    if state.phase is Phase.INVALID:
        return InvalidRequestError(
            "the certificate request was rejected as invalid by cert-manager",
            detail=f"{where} is invalid ({why})",
        )
    if state.phase is Phase.DELETED:
        # Someone (an operator, a policy, a sweeper elsewhere) removed it: retrying is right.
        return UnavailableError("the certificate request was deleted before it was signed", detail=f"{where}: {why}")
    return FailedPreconditionError(
        f"the cert-manager {issuer} failed to sign the request; check the issuer",
        detail=f"{where} failed ({why})",
    )


def timeout_error(state: RequestState, *, name: str, issuer: str, waited: float) -> CSRServiceError:
    """The error when ``waited`` seconds passed without a terminal state.

    Not approved → DEADLINE_EXCEEDED naming approval (approver-policy leaves unmatched requests
    alone). Approved but the issuer itself is missing or not Ready → FAILED_PRECONDITION: an
    operator has to act. Otherwise the issuer is just slow → DEADLINE_EXCEEDED.
    """
    where = f"CertificateRequest {name} for {issuer}"
    if state.phase is Phase.WAITING_FOR_APPROVAL:
        return DeadlineExceededError(
            "the certificate request was not approved in time; check the cluster's cert-manager approver or "
            "approver-policy",
            detail=f"{where}: {state.describe()} after {waited:.1f}s; no approver approved or denied it "
            "(is an approver running, does an approver-policy match it?)",
        )
    if state.message.startswith(_ISSUER_PROBLEMS):
        return FailedPreconditionError(
            f"the cert-manager {issuer} is not ready to sign",
            detail=f"{where}: {state.describe()} after {waited:.1f}s",
        )
    return DeadlineExceededError(
        f"the cert-manager {issuer} did not sign in time",
        detail=f"{where}: {state.describe()} after {waited:.1f}s",
    )
