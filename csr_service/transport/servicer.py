"""The thin gRPC servicer: admit the call, unpack it, run the pipeline, map errors, pack the answer.

No crypto and no backend calls here. Every request gets a request id (in every log line
about it, and in the error message the client sees, so an operator can find the detail)
and a server-side deadline, because istio-agent sends none. A call above
``--max-concurrent-requests`` is refused before any work (:mod:`csr_service.transport.admission`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.common.errors import (
    CSRServiceError,
    DeadlineExceededError,
    InternalError,
    LoadShedError,
    status_code_for,
)
from csr_service.common.request import REQUEST_ID, RequestContext, new_request_id
from csr_service.infra.metrics import count_shed, observe_rpc
from csr_service.pipeline.handler import CertificatePipeline
from csr_service.transport.admission import Admission, ShedLog

__all__ = ["IstioCertificateServicer"]

log = logging.getLogger(__name__)

_CLIENT_ERROR_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
}


def _metadata(struct: struct_pb2.Struct) -> dict[str, Any]:
    if not struct.fields:
        return {}
    # Plain Python values (str, float, bool, None, dict, list): the pipeline checks types.
    return json_format.MessageToDict(struct)


def _peer_certificates(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[bytes, ...]:
    """The client certificate gRPC core verified in the handshake, leaf first, then the rest of
    the chain the client sent (gRPC core reports the leaf and the chain as two properties)."""
    auth = context.auth_context() or {}
    leaf = tuple(auth.get("x509_pem_cert", ()))
    if not leaf:
        return ()
    rest = tuple(_split_pem(b"".join(auth.get("x509_pem_cert_chain", ()))))
    return leaf[:1] + tuple(c for c in rest if c.strip() != leaf[0].strip())


def _split_pem(data: bytes) -> list[bytes]:
    end = b"-----END CERTIFICATE-----"
    return [block + end + b"\n" for block in data.split(end) if b"-----BEGIN CERTIFICATE-----" in block]


class IstioCertificateServicer(ca_pb2_grpc.IstioCertificateServiceServicer):
    """``istio.v1.auth.IstioCertificateService``."""

    def __init__(
        self,
        pipeline: CertificatePipeline,
        *,
        timeout: timedelta,
        admission: Admission,
        client_certificates: bool = False,
    ) -> None:
        self._pipeline = pipeline
        self._timeout = timeout.total_seconds()
        self._admission = admission
        self._shed_log = ShedLog(log)
        #: Whether a listener asks for client certificates: only then is the auth context read.
        self._client_certificates = client_certificates

    def _done(self, _context: object) -> None:
        self._admission.leave()

    @observe_rpc("istio.v1.auth.IstioCertificateService", "CreateCertificate")
    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        rid = new_request_id()
        REQUEST_ID.set(rid)
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        peer_certs = _peer_certificates(context) if self._client_certificates else ()
        ctx = RequestContext(metadata=md, peer=context.peer() or "", request_id=rid, peer_certificates=peer_certs)
        error: CSRServiceError
        try:
            self._admission.enter()
            # Counted out when the answer has been sent, not when this coroutine returns:
            # sending is work this worker still does.
            context.add_done_callback(self._done)  # type: ignore[arg-type]  # grpc-stubs wants a class
            async with asyncio.timeout(self._timeout):
                chain = await self._pipeline.create_certificate(
                    request.csr, request.validity_duration, _metadata(request.metadata), ctx
                )
            return ca_pb2.IstioCertificateResponse(cert_chain=chain)
        except TimeoutError:
            error = DeadlineExceededError(
                "the certificate was not issued in time",
                detail=f"request exceeded the {self._timeout:g}s deadline",
            )
        except CSRServiceError as exc:
            error = exc
        except Exception:  # a bug: log it with its traceback, never send it to the client
            log.exception("unexpected error while handling CreateCertificate")
            error = InternalError("internal error")
        code = status_code_for(error)
        if isinstance(error, LoadShedError):
            count_shed(error.reason)
            self._shed_log.note(error)
        else:
            level = logging.WARNING if code in _CLIENT_ERROR_CODES else logging.ERROR
            log.log(level, "CreateCertificate failed code=%s peer=%s: %s", code.name, ctx.peer, error.detail)
        await context.abort(code, f"{error.public} (request id {rid})")
        raise AssertionError("unreachable: abort raises")
