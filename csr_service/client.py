"""Talking to an Istio CA the way istio-agent does, and the one-shot ``request`` client.

The pieces (:func:`new_csr`, :func:`build_request`, :func:`call_metadata`,
:func:`channel_credentials`, :func:`check_response`) are shared by ``csr-service request``
(one synchronous call, below) and the long-running ``csr-service agent``
(:mod:`csr_service.agent`, which makes the same call on ``grpc.aio``): one CSR shape, one set of
metadata, one check of the answer, for csr-service and for istiod's own CA alike.

``request`` generates a key and an istio-agent-shaped CSR, calls CreateCertificate over TLS
(verifying the server against ``--root-cert``), verifies the returned chain against the returned
root bundle, and writes ``key.pem`` (0600), ``cert-chain.pem`` and ``root-cert.pem`` as one
atomic set — the layout that workloads without sidecars mount.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.infra.fsutil import write_file_set
from csr_service.pki.certs import build_csr
from csr_service.pki.chain import ChainError, build_path
from csr_service.pki.keys import KeyType, PrivateKey, generate_key
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import key_to_pem, parse_certs

__all__ = [
    "Issued",
    "RequestError",
    "RequestResult",
    "build_request",
    "call_metadata",
    "channel_credentials",
    "channel_options",
    "check_response",
    "identity_uri",
    "new_csr",
    "request_certificate",
    "rpc_error",
    "workload_files",
]

#: What istio-agent's citadel client sets: no deadline of its own; we bound each call instead.
DEFAULT_TIMEOUT = 30.0


class RequestError(Exception):
    """The call failed (``code`` is the gRPC status name) or the answer did not verify."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Issued:
    """A verified answer: the key we generated, the leaf, the chain and root bundle as sent."""

    key: PrivateKey
    leaf: x509.Certificate
    chain_pem: str  # leaf + intermediates, what cert-chain.pem holds
    root_pem: str  # the root bundle (the answer's last element), what root-cert.pem holds
    chain_len: int

    @property
    def key_pem(self) -> bytes:
        return key_to_pem(self.key)


@dataclass(frozen=True, slots=True)
class RequestResult:
    identity: str
    leaf: x509.Certificate
    chain_len: int
    out_dir: Path


def identity_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def new_csr(identity: str, key_type: KeyType) -> tuple[PrivateKey, str]:
    """A fresh key and istio-agent's CSR for it (PEM): ``O=""``, one critical URI SAN."""
    key = generate_key(key_type)
    return key, build_csr(key, uris=(identity,)).public_bytes(serialization.Encoding.PEM).decode()


def build_request(csr_pem: str, ttl: timedelta) -> ca_pb2.IstioCertificateRequest:
    """The request istio-agent sends: the CSR, ``validity_duration`` in seconds, CertSigner ""."""
    return ca_pb2.IstioCertificateRequest(
        csr=csr_pem,
        validity_duration=int(ttl.total_seconds()),
        metadata=struct_pb2.Struct(fields={"CertSigner": struct_pb2.Value(string_value="")}),
    )


def call_metadata(token: str | None, cluster_id: str | None) -> list[tuple[str, str]]:
    """gRPC metadata as istio-agent sends it (no ``authorization`` without a token)."""
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if cluster_id:
        metadata.append(("clusterid", cluster_id))
    return metadata


def channel_credentials(root_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_pem)


def channel_options(tls_server_name: str | None) -> list[tuple[str, str]]:
    """``tls_server_name``: the name checked in the CA's certificate instead of the address's
    host (istio-agent's ``ISTIOD_SAN``), e.g. ``istiod.istio-system.svc`` when dialing an IP."""
    return [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []


def rpc_error(exc: grpc.RpcError) -> RequestError:
    """A failed call as ``CODE: message``, with a hint when TLS verification is the reason."""
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if "CERTIFICATE_VERIFY_FAILED" in details or "handshake" in details.lower():
        details += (
            " (the CA's serving certificate does not verify against the root certificate given, or does not"
            " carry the expected name: check --root-cert and --tls-server-name)"
        )
    return RequestError(code, details)


def check_response(chain: list[str], identity: str, key: PrivateKey, *, now: datetime | None = None) -> Issued:
    """Verify an answer: leaf first, root bundle last, the path verifies, the leaf is for
    ``identity`` and certifies ``key``. Raise RequestError(INVALID_RESPONSE) otherwise."""
    if len(chain) < 2:
        raise RequestError("INVALID_RESPONSE", f"expected leaf + root bundle, got {len(chain)} element(s)")
    try:
        leaf = parse_certs(chain[0].encode(), what="leaf")[0]
        intermediates = [c for pem in chain[1:-1] for c in parse_certs(pem.encode(), what="intermediate")]
        roots = parse_certs(chain[-1].encode(), what="root bundle")
        build_path(leaf, intermediates, roots, now=now or datetime.now(UTC))
    except (ValueError, ChainError) as exc:
        raise RequestError("INVALID_RESPONSE", f"returned chain does not verify: {exc}") from exc
    if subject_alt_names(leaf).uris != (identity,):
        raise RequestError("INVALID_RESPONSE", f"certificate is not for {identity}")
    fmt, enc = serialization.PublicFormat.SubjectPublicKeyInfo, serialization.Encoding.DER
    if leaf.public_key().public_bytes(enc, fmt) != key.public_key().public_bytes(enc, fmt):
        raise RequestError("INVALID_RESPONSE", "certificate is not for the key we sent")
    # One certificate per element, each ending with a newline, as istiod sends them.
    chain_pem = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in chain[:-1])
    root_pem = chain[-1] if chain[-1].endswith("\n") else chain[-1] + "\n"
    return Issued(key=key, leaf=leaf, chain_pem=chain_pem, root_pem=root_pem, chain_len=len(chain))


def workload_files(issued: Issued, *, tls_layout: bool = False) -> dict[str, tuple[bytes, int]]:
    """The files a workload mounts (name -> (content, mode)): Istio's names, and with
    ``tls_layout`` also ``tls.crt``/``tls.key``/``ca.crt`` (a kubernetes.io/tls Secret's)."""
    files = {
        "cert-chain.pem": (issued.chain_pem.encode(), 0o644),
        "key.pem": (issued.key_pem, 0o600),
        "root-cert.pem": (issued.root_pem.encode(), 0o644),
    }
    if tls_layout:
        files |= {
            "tls.crt": files["cert-chain.pem"],
            "tls.key": files["key.pem"],
            "ca.crt": files["root-cert.pem"],
        }
    return files


def request_certificate(
    *,
    ca_address: str,
    root_cert: Path,
    token: str | None,
    trust_domain: str,
    namespace: str,
    service_account: str,
    out_dir: Path,
    key_type: KeyType = KeyType.EC_P256,
    ttl: timedelta = timedelta(hours=1),
    cluster_id: str | None = "Kubernetes",
    tls_server_name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> RequestResult:
    """Obtain a certificate and write it to ``out_dir``; raise RequestError on failure."""
    identity = identity_uri(trust_domain, namespace, service_account)
    key, csr = new_csr(identity, key_type)
    creds = channel_credentials(root_cert.read_bytes())
    with grpc.secure_channel(ca_address, creds, options=channel_options(tls_server_name)) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = stub.CreateCertificate(
                build_request(csr, ttl), metadata=call_metadata(token, cluster_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    issued = check_response(list(resp.cert_chain), identity, key)
    # One atomic set: a watcher never finds the new chain beside the old key.
    write_file_set(out_dir, workload_files(issued))
    return RequestResult(identity=identity, leaf=issued.leaf, chain_len=issued.chain_len, out_dir=out_dir)
