"""The CertificateRequest API calls, and translating their failures into csr_service errors.

The ``kubernetes`` client is synchronous: every call runs in this issuer's own thread pool
(not asyncio's default one, which is sized for CPUs, not for I/O waits) and goes through the
shared, rate-limited ``ApiClient`` (``--kube-qps``/``--kube-burst``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

from csr_service.errors import (
    CSRServiceError,
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)

__all__ = ["GROUP", "PLURAL", "VERSION", "RequestsApi", "api_error"]

GROUP = "cert-manager.io"
VERSION = "v1"
PLURAL = "certificaterequests"
RESOURCE = f"{PLURAL}.{GROUP}"


def api_error(exc: BaseException, *, verb: str, namespace: str) -> CSRServiceError:
    """Classify a failed call to ``verb`` CertificateRequests in ``namespace``."""
    from kubernetes.client.exceptions import ApiException

    what = f"{verb} {RESOURCE} in namespace {namespace}"
    if not isinstance(exc, ApiException):
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
    """``CustomObjectsApi`` calls on CertificateRequests in one namespace, as plain callables."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._custom = client.CustomObjectsApi(api_client)
        self._auth = client.AuthorizationV1Api(api_client)

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
