"""Where the agent puts certificates: a directory (one atomic set of files) or a Secret.

Both speak in *renderings*: ``name -> bytes`` for every name the output manages. What the agent
wrote last is remembered as a rendering, and the output is read back as one, so "deleted or
tampered with" is a plain comparison, and a certificate found at start can be adopted instead of
replaced (a restarted agent does not ask for a new certificate it does not need).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from csr_service.client import Issued, RequestError, workload_files
from csr_service.infra.fsutil import write_file_set

__all__ = ["WRITTEN_BY", "FileOutput", "Output", "Rendering", "SecretOutput", "secret_data"]

log = logging.getLogger(__name__)

Rendering = Mapping[str, bytes]
#: Annotation on the Secret naming the agent (leader identity) that wrote it last.
WRITTEN_BY = "agent.csr-service.io/written-by"
TLS_TYPE = "kubernetes.io/tls"


class Output(Protocol):
    """One destination. ``read`` returns None when nothing is there; both raise RequestError
    (code ``OUTPUT_ERROR`` or ``FAILED_PRECONDITION``) when the destination cannot be used."""

    name: str

    def render(self, issued: Issued) -> dict[str, bytes]: ...

    async def read(self) -> Rendering | None: ...

    async def write(self, issued: Issued) -> None: ...


class FileOutput:
    """``cert-chain.pem``, ``key.pem`` (0600), ``root-cert.pem`` (and with ``tls_layout``
    ``tls.crt``, ``tls.key``, ``ca.crt``) in ``directory``, published by
    :func:`~csr_service.infra.fsutil.write_file_set` as one atomic set."""

    def __init__(self, directory: Path, *, tls_layout: bool = False) -> None:
        self.directory = directory
        self.tls_layout = tls_layout
        self.name = f"files:{directory}"

    def render(self, issued: Issued) -> dict[str, bytes]:
        return {name: content for name, (content, _) in workload_files(issued, tls_layout=self.tls_layout).items()}

    def _names(self) -> tuple[str, ...]:
        base = ("cert-chain.pem", "key.pem", "root-cert.pem")
        return (*base, "tls.crt", "tls.key", "ca.crt") if self.tls_layout else base

    async def read(self) -> Rendering | None:
        found: dict[str, bytes] = {}
        for name in self._names():
            try:
                found[name] = (self.directory / name).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise RequestError("OUTPUT_ERROR", f"cannot read {self.directory / name}: {exc.strerror}") from exc
        return found

    async def write(self, issued: Issued) -> None:
        try:
            await asyncio.to_thread(write_file_set, self.directory, workload_files(issued, tls_layout=self.tls_layout))
        except OSError as exc:
            raise RequestError("OUTPUT_ERROR", f"cannot write to {self.directory}: {exc.strerror or exc}") from exc


def secret_data(issued: Issued) -> dict[str, bytes]:
    """A kubernetes.io/tls Secret's keys plus Istio's, for consumers that mount either."""
    chain, key, root = issued.chain_pem.encode(), issued.key_pem, issued.root_pem.encode()
    return {
        "tls.crt": chain,
        "tls.key": key,
        "ca.crt": root,
        "cert-chain.pem": chain,
        "key.pem": key,
        "root-cert.pem": root,
    }


class SecretOutput:
    """A ``kubernetes.io/tls`` Secret, created or updated in one write.

    An update is a ``replace`` of the object just read, carrying its resourceVersion: all our
    keys change in the same write (nobody ever reads a new ``tls.crt`` beside an old
    ``tls.key``), keys, labels and annotations of others stay as they are, and a concurrent
    writer (a former leader's last write) makes it fail with 409 instead of being overwritten
    blindly; we then read again and retry.
    """

    def __init__(self, api: Any, namespace: str, secret: str, *, identity: str) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api)
        self.namespace = namespace
        self.secret = secret
        self.identity = identity
        self.name = f"secret:{namespace}/{secret}"
        #: Cleared when this replica stops leading: a write in flight in its thread then makes
        #: no further attempt (at most the one request already sent lands, a whole set).
        self.active = True

    def render(self, issued: Issued) -> dict[str, bytes]:
        return secret_data(issued)

    async def read(self) -> Rendering | None:
        return await asyncio.to_thread(self._read)

    async def write(self, issued: Issued) -> None:
        await asyncio.to_thread(self._write, secret_data(issued))

    def _get(self) -> Any:
        from kubernetes.client import ApiException

        try:
            return self._core.read_namespaced_secret(self.secret, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"read Secret {self.namespace}/{self.secret}") from exc
        except (OSError, ValueError) as exc:  # connection trouble (urllib3 errors are OSErrors)
            raise RequestError("UNAVAILABLE", f"the Kubernetes API cannot be reached: {exc}") from exc

    def _read(self) -> Rendering | None:
        obj = self._get()
        if obj is None:
            return None
        data = obj.data or {}
        return {k: base64.b64decode(v) for k, v in data.items() if k in _OUR_KEYS}

    def _write(self, ours: dict[str, bytes]) -> None:
        from kubernetes import client
        from kubernetes.client import ApiException

        encoded: dict[str, bytes | str] = {k: base64.b64encode(v).decode() for k, v in ours.items()}
        what = f"write Secret {self.namespace}/{self.secret}"
        for _ in range(5):
            if not self.active:
                raise RequestError("ABORTED", f"{what}: no longer the leader")
            obj = self._get()
            try:
                if obj is None:
                    body = client.V1Secret(
                        metadata=client.V1ObjectMeta(
                            name=self.secret, namespace=self.namespace, annotations={WRITTEN_BY: self.identity}
                        ),
                        type=TLS_TYPE,
                        data=encoded,
                    )
                    self._core.create_namespaced_secret(self.namespace, body)
                    return
                if obj.type != TLS_TYPE:
                    # The type of a Secret cannot be changed; replacing it would delete others' data.
                    raise RequestError(
                        "FAILED_PRECONDITION",
                        f"Secret {self.namespace}/{self.secret} exists with type {obj.type!r}, not {TLS_TYPE}; "
                        "delete it or choose another --output-secret",
                    )
                obj.data = {**(obj.data or {}), **encoded}
                obj.metadata.annotations = {**(obj.metadata.annotations or {}), WRITTEN_BY: self.identity}
                self._core.replace_namespaced_secret(self.secret, self.namespace, obj)
                return
            except ApiException as exc:
                if exc.status == 409:  # created or changed since our read: read again
                    continue
                raise _api_error(exc, what) from exc
            except (OSError, ValueError) as exc:
                raise RequestError("UNAVAILABLE", f"the Kubernetes API cannot be reached: {exc}") from exc
        raise RequestError("ABORTED", f"{what}: conflicting writers, gave up after 5 attempts")


_OUR_KEYS = frozenset({"tls.crt", "tls.key", "ca.crt", "cert-chain.pem", "key.pem", "root-cert.pem"})


def _api_error(exc: Any, what: str) -> RequestError:
    status = getattr(exc, "status", None)
    code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 422: "INVALID_ARGUMENT"}.get(
        status or 0, "UNAVAILABLE"
    )
    return RequestError(code, f"{what}: HTTP {status} {getattr(exc, 'reason', '')}".strip())
