"""The agent's calls to the CA: a ``grpc.aio`` connection per certificate, verified with the roots
of the root file, which is re-read on change.

The root file is the ``istio-ca-root-cert`` ConfigMap mount, which the kubelet updates in place
during a root rotation; :meth:`CAClient.root_changed` notices (content, not mtime: the kubelet's
symlink swap keeps mtimes of the visible path unreliable) and the next call uses the new roots.
The token file is read for every call (projected tokens are rotated by the kubelet), and never
logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import timedelta
from pathlib import Path

import grpc

from csr_service._generated import ca_pb2_grpc
from csr_service.client import (
    Issued,
    RequestError,
    build_request,
    call_metadata,
    channel_credentials,
    channel_options,
    check_response,
    new_csr,
    rpc_error,
)
from csr_service.pki.keys import KeyType

__all__ = ["CAClient"]

log = logging.getLogger(__name__)


class CAClient:
    """Issue certificates for one identity from the CA at ``address``."""

    def __init__(
        self,
        *,
        address: str,
        root_file: Path,
        token_file: Path,
        identity: str,
        cluster_id: str | None,
        key_type: KeyType,
        ttl: timedelta,
        tls_server_name: str | None,
        timeout: float,
    ) -> None:
        self._address = address
        self._root_file = root_file
        self._token_file = token_file
        self.identity = identity
        self._cluster_id = cluster_id
        self._key_type = key_type
        self._ttl = ttl
        self._server_name = tls_server_name
        self._timeout = timeout
        self._creds: grpc.ChannelCredentials | None = None
        self._root_digest = ""
        self._root_read_ok = True
        #: Counts the distinct root files loaded: a certificate obtained under an older one
        #: is renewed (a rotator compares the generation it wrote under).
        self.root_generation = 0

    def _read_root(self) -> bytes | None:
        try:
            data = self._root_file.read_bytes()
        except OSError as exc:
            if self._root_read_ok:
                log.warning("cannot read the root file %s (%s); keeping the roots read before", self._root_file, exc)
            self._root_read_ok = False
            return None
        self._root_read_ok = True
        return data if data.strip() else None

    def root_changed(self) -> bool:
        """Re-read the root file; True (the next call verifies the CA with the new roots) when its
        content changed since the last read. The first call only loads it."""
        data = self._read_root()
        if data is None:
            return False
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._root_digest:
            return False
        first = not self._root_digest
        self._root_digest = digest
        self.root_generation += 1
        self._creds = channel_credentials(data)
        if not first:
            log.info("root file %s changed; connecting to the CA with the new roots", self._root_file)
        return not first

    async def issue(self) -> Issued:
        """One CreateCertificate with a new key; the answer verified. Raises RequestError."""
        if self._creds is None:
            self.root_changed()
            if self._creds is None:
                raise RequestError("FAILED_PRECONDITION", f"no usable root certificate in {self._root_file}")
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            raise RequestError(
                "FAILED_PRECONDITION", f"cannot read the token file {self._token_file}: {exc.strerror}"
            ) from exc
        # A key per certificate; RSA key generation takes tens of milliseconds: off the loop.
        if self._key_type is KeyType.RSA2048:
            key, csr = await asyncio.to_thread(new_csr, self.identity, self._key_type)
        else:
            key, csr = new_csr(self.identity, self._key_type)
        # A connection per certificate, closed after the call: an agent calls once per renewal
        # (every 30 s to 12 h), and thousands of agents each holding an idle connection would
        # count against the CA's connection limits (csr-service: --max-connections per worker)
        # for nothing. The cost is one TLS handshake per certificate (bench.agent measures it).
        channel = grpc.aio.secure_channel(self._address, self._creds, options=channel_options(self._server_name))
        try:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            resp = await stub.CreateCertificate(
                build_request(csr, self._ttl),
                metadata=call_metadata(token or None, self._cluster_id),
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
        finally:
            await channel.close(None)
        return check_response(list(resp.cert_chain), self.identity, key)

    async def close(self) -> None:
        """Nothing is held between calls; kept for the owner's symmetric start/stop."""
