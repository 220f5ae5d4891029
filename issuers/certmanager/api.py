"""The CertificateRequest API calls, and translating their failures into csr_service errors.

The two calls made for every CSR, create and delete, run on the event loop
(:mod:`csr_service.kube.rest`, same credentials and QPS/burst bucket as the ``kubernetes``
client). Everything else — the watch's list/watch, re-GETs, the sweeper, the RBAC check —
uses the synchronous ``kubernetes`` client in a thread pool (this issuer's own, not asyncio's
default one, which is sized for CPUs, not for I/O waits), as do create and delete when the
event-loop path cannot stand in for the client (a proxy, a test's fake client).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, cast
from urllib.parse import quote

from csr_service.common.errors import (
    CSRServiceError,
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.kube.rest import KubeAPIError, KubeREST, for_client

__all__ = ["GROUP", "PLURAL", "VERSION", "RequestsApi", "api_error"]

GROUP = "cert-manager.io"
VERSION = "v1"
PLURAL = "certificaterequests"
RESOURCE = f"{PLURAL}.{GROUP}"


def api_error(exc: BaseException, *, verb: str, namespace: str) -> CSRServiceError:
    """Classify a failed call to ``verb`` CertificateRequests in ``namespace``."""
    from kubernetes.client.exceptions import ApiException

    what = f"{verb} {RESOURCE} in namespace {namespace}"
    if not isinstance(exc, ApiException | KubeAPIError):
        # urllib3 connection errors, timeouts, resets: the apiserver is unreachable right now.
        return UnavailableError("the Kubernetes API is unavailable", detail=f"{what}: {type(exc).__name__}: {exc}")
    status = exc.status or 0
    body = str(exc.body or exc.reason or "")[:500]
    if status == 403:
        return FailedPreconditionError(
            f"csr-service is not allowed to {verb} CertificateRequests; grant verb {verb!r} on {RESOURCE} "
            f"in namespace {namespace}",
            detail=f"{what}: forbidden (missing RBAC permission {verb!r} on {RESOURCE}): {body}",
        )
    if status == 404 and verb in {"create", "list", "watch"}:
        return FailedPreconditionError(
            f"cannot {verb} CertificateRequests in namespace {namespace}: is cert-manager installed and the "
            "namespace present?",
            detail=f"{what}: 404 Not Found: {body}",
        )
    if status in (400, 422):
        return FailedPreconditionError(
            "cert-manager rejected the CertificateRequest; check the --certmanager-* settings",
            detail=f"{what}: {status}: {body}",
        )
    if status == 429:
        return ResourceExhaustedError("the Kubernetes API is rate limiting csr-service", detail=f"{what}: 429: {body}")
    return UnavailableError("the Kubernetes API is unavailable", detail=f"{what}: {status} {exc.reason}: {body}")


class RequestsApi:
    """CertificateRequest calls in one namespace: blocking ones for threads, and the per-CSR
    create/delete as coroutines (:meth:`acreate`, :meth:`adelete`).

    Args:
        api_client: the shared ``kubernetes.client.ApiClient``.
        namespace: where our requests live.
        executor: runs the blocking calls when the event-loop path is not available.
    """

    def __init__(self, api_client: Any, namespace: str, executor: Executor) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._custom = client.CustomObjectsApi(api_client)
        self._auth = client.AuthorizationV1Api(api_client)
        self._executor = executor
        self._rest: KubeREST | None = for_client(api_client)
        self._collection = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace, safe='')}/{PLURAL}"

    @property
    def event_loop_calls(self) -> bool:
        """Whether create/delete run on the event loop (logged at start)."""
        return self._rest is not None

    async def acreate(self, body: dict[str, Any]) -> dict[str, Any]:
        """:meth:`create` as a coroutine."""
        if self._rest is None:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.create, body)
        return await self._rest.call("POST", self._collection, body)

    async def adelete(self, name: str) -> None:
        """:meth:`delete` as a coroutine."""
        if self._rest is None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.delete, name)
        else:
            await self._rest.call("DELETE", f"{self._collection}/{quote(name, safe='')}")

    async def aclose(self) -> None:
        """Close the event-loop connections."""
        if self._rest is not None:
            await self._rest.aclose()

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a CertificateRequest; returns the created object."""
        return cast(
            dict[str, Any], self._custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        )

    def get(self, name: str) -> dict[str, Any]:
        """GET one CertificateRequest."""
        return cast(
            dict[str, Any], self._custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        )

    def delete(self, name: str) -> None:
        """DELETE one CertificateRequest."""
        self._custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    @property
    def list_fn(self) -> Callable[..., Any]:
        """The list call (also used for watches) bound to our namespace."""
        return functools.partial(self._custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL)

    def missing_verbs(self, verbs: tuple[str, ...]) -> list[str]:
        """Which of ``verbs`` on CertificateRequests in our namespace we are not allowed (SelfSubjectAccessReview)."""
        from kubernetes import client

        missing = []
        for verb in verbs:
            review = client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        group=GROUP, resource=PLURAL, verb=verb, namespace=self.namespace
                    )
                )
            )
            result = self._auth.create_self_subject_access_review(review)
            if not (result.status and result.status.allowed):
                missing.append(verb)
        return missing
