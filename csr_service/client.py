"""The ``request`` client: do what istio-agent does, then write the files a workload mounts.

Generates a key and an istio-agent-shaped CSR, calls CreateCertificate over TLS (verifying
the server against ``--root-cert``), verifies the returned chain against the returned root
bundle, and writes ``key.pem`` (0600), ``cert-chain.pem`` and ``root-cert.pem`` atomically —
the layout that workloads without sidecars mount.
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
from csr_service.infra.fsutil import write_atomic
from csr_service.pki.certs import build_csr
from csr_service.pki.chain import ChainError, build_path
from csr_service.pki.keys import KeyType, generate_key
from csr_service.pki.names import subject_alt_names
from csr_service.pki.pem import key_to_pem, parse_certs

__all__ = ["RequestError", "RequestResult", "request_certificate"]


class RequestError(Exception):
    """The call failed (``code`` is the gRPC status name) or the answer did not verify."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestResult:
    identity: str
    leaf: x509.Certificate
    chain_len: int
    out_dir: Path


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
    timeout: float = 30.0,
) -> RequestResult:
    """Obtain a certificate and write it to ``out_dir``; raise RequestError on failure."""
    identity = f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
    key = generate_key(key_type)
    csr = build_csr(key, uris=(identity,)).public_bytes(serialization.Encoding.PEM).decode()
    metadata: list[tuple[str, str]] = []
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    if cluster_id:
        metadata.append(("clusterid", cluster_id))
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    creds = grpc.ssl_channel_credentials(root_certificates=root_cert.read_bytes())
    req = ca_pb2.IstioCertificateRequest(
        csr=csr,
        validity_duration=int(ttl.total_seconds()),
        metadata=struct_pb2.Struct(fields={"CertSigner": struct_pb2.Value(string_value="")}),
    )
    with grpc.secure_channel(ca_address, creds, options=options) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = stub.CreateCertificate(req, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise RequestError(exc.code().name, exc.details() or "") from exc
    chain = list(resp.cert_chain)
    if len(chain) < 2:
        raise RequestError("INVALID_RESPONSE", f"expected leaf + root bundle, got {len(chain)} element(s)")
    try:
        leaf = parse_certs(chain[0].encode(), what="leaf")[0]
        intermediates = [c for pem in chain[1:-1] for c in parse_certs(pem.encode(), what="intermediate")]
        roots = parse_certs(chain[-1].encode(), what="root bundle")
        build_path(leaf, intermediates, roots, now=datetime.now(UTC))
    except (ValueError, ChainError) as exc:
        raise RequestError("INVALID_RESPONSE", f"returned chain does not verify: {exc}") from exc
    if subject_alt_names(leaf).uris != (identity,):
        raise RequestError("INVALID_RESPONSE", f"certificate is not for {identity}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Key first, then chain, then roots: a watcher that reloads on cert-chain.pem finds
    # the matching key already in place.
    write_atomic(out_dir / "key.pem", key_to_pem(key), mode=0o600)
    write_atomic(out_dir / "cert-chain.pem", "".join(chain[:-1]))
    write_atomic(out_dir / "root-cert.pem", chain[-1])
    return RequestResult(identity=identity, leaf=leaf, chain_len=len(chain), out_dir=out_dir)
