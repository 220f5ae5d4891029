"""csr-service serve --dev as a subprocess, driven by `csr-service request` and by raw gRPC."""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import process_tree
from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.infra.malloc import TCACHE_COUNT
from csr_service.service.dev import dev_jwt_algorithm
from tests.support.certs import csr_pem, uri_sans
from tests.support.der import CN_OID, EDI, TAG_INTEGER, X400, hostile_csr, uri_name
from tests.support.dev_server import BOTH_TRANSPORTS, CSR_SERVICE, TRANSPORTS, DevServer, running_dev_server
from tests.support.pki import load_certs, new_key, verify_chain
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

ID = "spiffe://cluster.local/ns/default/sa/sleep"


def _request_cli(srv: DevServer, out: Path, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    tok = out.parent / "token"
    tok.parent.mkdir(parents=True, exist_ok=True)
    tok.write_text(token)
    args = [*CSR_SERVICE, "request", "--ca-address", srv.address, "--root-cert", str(srv.root_cert)]
    args += ["--token-file", str(tok), "--trust-domain", "cluster.local", "--namespace", "default"]
    args += ["--service-account", "sleep", "--out-dir", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


@BOTH_TRANSPORTS
@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa2048"])
def test_request_cli_writes_workload_files(dev_server: DevServer, out_dir: Path, key_type: str) -> None:
    res = _request_cli(dev_server, out_dir, dev_server.token("default", "sleep"), "--key-type", key_type)
    assert res.returncode == 0, res.stderr
    assert (out_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    chain = load_certs((out_dir / "cert-chain.pem").read_bytes())
    roots = load_certs((out_dir / "root-cert.pem").read_bytes())
    assert roots == load_certs(dev_server.root_cert.read_bytes())
    assert uri_sans(chain[0]) == [ID]
    verify_chain(chain[0], chain[1:], roots)
    key = serialization.load_pem_private_key((out_dir / "key.pem").read_bytes(), None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, pub) == chain[0].public_key().public_bytes(
        serialization.Encoding.DER, pub
    )


@BOTH_TRANSPORTS
def test_request_cli_reports_status_on_failure(dev_server: DevServer, out_dir: Path) -> None:
    res = _request_cli(dev_server, out_dir, dev_server.token("default", "other"))
    assert res.returncode == 1
    assert "UNAUTHENTICATED" in res.stderr
    assert not out_dir.exists() or not any(out_dir.iterdir())  # nothing half-written


# --- raw gRPC ---------------------------------------------------------------------------


def _call(
    srv: DevServer,
    csr: bytes | str,
    token: str | None,
    *,
    md: dict[str, str] | None = None,
    ttl: int = 3600,
    meta: dict[str, Any] | None = None,
) -> ca_pb2.IstioCertificateResponse:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else []
    metadata += list((md or {}).items())
    struct = struct_pb2.Struct()
    struct.update(meta or {})
    req = ca_pb2.IstioCertificateRequest(
        csr=csr.decode() if isinstance(csr, bytes) else csr, validity_duration=ttl, metadata=struct
    )
    with srv.channel() as ch:
        return ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(req, metadata=metadata, timeout=30)


def _dev_key(srv: DevServer) -> tuple[Any, str]:
    key = serialization.load_pem_private_key((srv.state_dir / "jwt-signing-key.pem").read_bytes(), None)
    kid = json.loads((srv.state_dir / "jwks.json").read_text())["keys"][0]["kid"]
    return key, kid


def _forged(srv: DevServer, **claims: Any) -> str:
    key, kid = _dev_key(srv)
    other = claims.pop("_key", None)
    now = int(time.time())
    body = {
        "iss": "https://csr-service.dev.invalid",
        "sub": "system:serviceaccount:default:sleep",
        "aud": ["istio-ca"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    signer = other or key
    return jwt.encode(body, signer, algorithm=dev_jwt_algorithm(signer), headers={"kid": kid})


def _alg_none() -> str:
    import base64

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return (
        b64({"alg": "none"})
        + "."
        + b64({"sub": "system:serviceaccount:default:sleep", "aud": ["istio-ca"], "iat": now, "exp": now + 600})
        + "."
    )


def _csr(
    names: list[x509.GeneralName] | None = None,
    subject: list[x509.NameAttribute] | None = None,
    ext: x509.ExtensionType | None = None,
    key: Any = None,
    algorithm: Any = None,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    b = b.add_extension(x509.SubjectAlternativeName(names or [x509.UniformResourceIdentifier(ID)]), critical=True)
    if ext is not None:
        b = b.add_extension(ext, critical=False)
    return b.sign(key, algorithm or hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _bad_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_csr()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


GOOD_CSR = lambda: csr_pem(new_key())  # noqa: E731
U, IA, PD = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
)

# name -> (csr factory, token factory(srv) or None, metadata, expected code)
BAD_INPUTS: dict[str, tuple[Any, Any, dict[str, str], grpc.StatusCode]] = {
    "missing token": (GOOD_CSR, None, {}, U),
    "malformed token": (GOOD_CSR, lambda s: "abc.def", {}, U),
    "expired token": (
        GOOD_CSR,
        lambda s: _forged(s, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        {},
        U,
    ),
    "not-yet-valid token": (GOOD_CSR, lambda s: _forged(s, nbf=int(time.time()) + 3600), {}, U),
    "wrong-audience token": (GOOD_CSR, lambda s: s.token("default", "sleep", audience="kubernetes"), {}, U),
    "wrong-signature token": (
        GOOD_CSR,
        lambda s: _forged(s, _key=rsa.generate_private_key(65537, 2048)),
        {},
        U,
    ),
    "alg none token": (GOOD_CSR, lambda s: _alg_none(), {}, U),
    "token for another service account": (GOOD_CSR, lambda s: s.token("default", "other"), {}, U),
    "unknown clusterid": (GOOD_CSR, lambda s: s.token("default", "sleep"), {"clusterid": "remote"}, U),
    "two URIs": (
        lambda: _csr([x509.UniformResourceIdentifier(ID), x509.UniformResourceIdentifier(ID + "x")]),
        None,
        {},
        IA,
    ),
    "DNS SAN": (lambda: _csr([x509.UniformResourceIdentifier(ID), x509.DNSName("a.example")]), None, {}, IA),
    "IP SAN": (
        lambda: _csr(
            [
                x509.UniformResourceIdentifier(ID),
                x509.IPAddress(__import__("ipaddress").ip_address("1.2.3.4")),
            ]
        ),
        None,
        {},
        IA,
    ),
    "email SAN": (lambda: _csr([x509.UniformResourceIdentifier(ID), x509.RFC822Name("a@b.c")]), None, {}, IA),
    "CN": (lambda: _csr(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "sleep")]), None, {}, IA),
    "non-SPIFFE URI": (lambda: _csr([x509.UniformResourceIdentifier("https://example.com/x")]), None, {}, IA),
    "other trust domain": (
        lambda: _csr([x509.UniformResourceIdentifier("spiffe://evil.td/ns/default/sa/sleep")]),
        None,
        {},
        U,
    ),
    "CA:TRUE": (lambda: _csr(ext=x509.BasicConstraints(ca=True, path_length=None)), None, {}, IA),
    "unknown extension": (
        lambda: _csr(ext=x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")),
        None,
        {},
        IA,
    ),
    "RSA-1024 key": (lambda: _csr(key=rsa.generate_private_key(65537, 1024)), None, {}, IA),
    "unsupported curve": (
        lambda: _csr(key=ec.generate_private_key(ec.SECP521R1()), algorithm=hashes.SHA512()),
        None,
        {},
        IA,
    ),
    "bad CSR signature": (_bad_signature, None, {}, IA),
    "garbage PEM": (lambda: b"garbage", None, {}, IA),
    "truncated PEM": (lambda: GOOD_CSR()[:150], None, {}, IA),
    "empty PEM": (lambda: b"", None, {}, IA),
    # Parse, but cryptography decodes these parts lazily and raised outside our error classes:
    "CSR version 2": (lambda: hostile_csr(version=1), None, {}, IA),
    "subject value of the wrong ASN.1 type": (
        lambda: hostile_csr(subject=[(CN_OID, TAG_INTEGER, b"\x05")]),
        None,
        {},
        IA,
    ),
    "x400Address SAN": (lambda: hostile_csr(san=[uri_name(ID), X400]), None, {}, IA),
    "ediPartyName SAN": (lambda: hostile_csr(san=[uri_name(ID), EDI]), None, {}, IA),
    "two CSRs": (lambda: GOOD_CSR() + GOOD_CSR(), None, {}, IA),
    # Above the pipeline's 64 KiB limit, below gRPC's message limit (next test).
    "200 KiB CSR": (lambda: GOOD_CSR() + b"A" * (200 * 1024), None, {}, IA),
}


@BOTH_TRANSPORTS
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_clear_status(dev_server: DevServer, case: str) -> None:
    csr, tok, md, code = BAD_INPUTS[case]
    token = (
        tok(dev_server) if tok else (dev_server.token("default", "sleep") if case not in {"missing token"} else None)
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(dev_server, csr(), token, md=md)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    assert "request id" in details
    assert "Traceback" not in details
    assert len(details) < 300  # short message; detail stays in the log


@BOTH_TRANSPORTS
def test_oversized_request_is_refused_by_grpc(dev_server: DevServer) -> None:
    # Requests above 256 KiB never reach csr-service: gRPC core refuses them, which bounds the
    # memory a worker's calls in progress can hold (--max-concurrent-requests of them).
    with pytest.raises(grpc.RpcError) as info:
        _call(dev_server, GOOD_CSR() + b"A" * (1024 * 1024), dev_server.token("default", "sleep"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    ok = _call(dev_server, GOOD_CSR(), dev_server.token("default", "sleep"))
    assert len(ok.cert_chain) >= 2


@BOTH_TRANSPORTS
def test_impersonation_is_refused(dev_server: DevServer) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(
            dev_server,
            GOOD_CSR(),
            dev_server.token("default", "sleep"),
            meta={"ImpersonatedIdentity": "spiffe://cluster.local/ns/default/sa/other"},
        )
    assert info.value.code() == PD


@BOTH_TRANSPORTS
@pytest.mark.parametrize("ttl", [-1, 0, 2**62])
def test_any_validity_duration_is_clamped(dev_server: DevServer, ttl: int) -> None:
    resp = _call(dev_server, GOOD_CSR(), dev_server.token("default", "sleep"), ttl=ttl)
    leaf = load_certs(resp.cert_chain[0].encode())[0]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life.total_seconds() <= 3600 + 120 + 5


@BOTH_TRANSPORTS
def test_server_survives_bad_input_and_logs_detail(dev_server: DevServer) -> None:
    for case in BAD_INPUTS:
        csr, tok, md, _ = BAD_INPUTS[case]
        token = tok(dev_server) if tok else None
        with pytest.raises(grpc.RpcError):
            _call(dev_server, csr(), token, md=md)
    with dev_server.channel() as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert _call(dev_server, GOOD_CSR(), dev_server.token("default", "sleep")).cert_chain
    log = dev_server.log()
    assert "CSR asks for 'spiffe://evil.td/ns/default/sa/sleep'" in log  # detail with request id in the log
    assert "Traceback" not in log
    assert "BEGIN CERTIFICATE REQUEST" not in log
    assert "eyJ" not in log


@BOTH_TRANSPORTS
def test_concurrent_requests(dev_server: DevServer) -> None:
    token = dev_server.token("default", "sleep")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _call(dev_server, GOOD_CSR(), token), range(64)))
    serials = {load_certs(r.cert_chain[0].encode())[0].serial_number for r in results}
    assert len(serials) == 64


# --- TLS --------------------------------------------------------------------------------


def _tls_connect(srv: DevServer, **kw: Any) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(srv.root_cert))
    ctx.set_alpn_protocols(["h2"])
    for k, v in kw.items():
        setattr(ctx, k, v)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    return ctx.wrap_socket(sock, server_hostname=kw.pop("server_hostname", "localhost"))


@BOTH_TRANSPORTS
def test_tls_alpn_h2_and_names(dev_server: DevServer) -> None:
    with _tls_connect(dev_server) as s:
        assert s.selected_alpn_protocol() == "h2"
        assert s.version() in {"TLSv1.2", "TLSv1.3"}
        cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


@BOTH_TRANSPORTS
def test_tls_below_1_2_is_refused(dev_server: DevServer) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we want the old protocol on purpose
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer TLS 1.1
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        pytest.raises(ssl.SSLError) as info,
        socket.create_connection(("127.0.0.1", dev_server.port), timeout=5) as raw,
        ctx.wrap_socket(raw),
    ):
        pass
    # The client did send a TLS 1.1 hello (no "no protocols available"), and the *server*
    # refused it: a protocol_version alert, or BoringSSL simply closing the connection.
    text = str(info.value).upper()
    assert "NO_PROTOCOLS_AVAILABLE" not in text
    assert "PROTOCOL_VERSION" in text.replace(" ", "_") or isinstance(info.value, ssl.SSLEOFError), info.value
    # Control: the same client settings with TLS 1.2 allowed get through.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", dev_server.port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        assert tls.version() == "TLSv1.2"


@BOTH_TRANSPORTS
def test_plaintext_is_refused_on_tls_port(dev_server: DevServer) -> None:
    with grpc.insecure_channel(dev_server.address) as ch, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert info.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@BOTH_TRANSPORTS
def test_reflection_lists_and_describes_the_service(dev_server: DevServer) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ask = reflection_pb2.ServerReflectionRequest
    with dev_server.channel() as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        # Several requests on one stream, each answered in turn (what grpcurl does).
        listed, described, unknown = stub.ServerReflectionInfo(
            iter(
                [
                    ask(list_services=""),
                    ask(file_containing_symbol="istio.v1.auth.IstioCertificateService"),
                    ask(file_containing_symbol="nope.Nope"),
                ]
            ),
            timeout=5,
        )
    names = {s.name for s in listed.list_services_response.service}
    assert "istio.v1.auth.IstioCertificateService" in names
    assert "grpc.health.v1.Health" in names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(s.name == "IstioCertificateService" for f in files for s in f.service)
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# --- lifecycle ----------------------------------------------------------------------------


def _peer_serial(srv: DevServer) -> int:
    with _tls_connect(srv) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_serving_certificate_rotates_without_dropping_connections(tmp_path: Path, transport: str) -> None:
    # The native transport loads the renewed certificate for the next connection it accepts.
    args = ("--serving-certificate-duration", "12s", "--grpc-transport", transport)
    with running_dev_server(tmp_path / "s", *args) as srv:
        token = srv.token("default", "sleep")
        first = _peer_serial(srv)
        with srv.channel() as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            md = [("authorization", f"Bearer {token}")]
            req = lambda: ca_pb2.IstioCertificateRequest(csr=GOOD_CSR().decode())  # noqa: E731
            stub.CreateCertificate(req(), metadata=md, timeout=10)
            wait_for(lambda: _peer_serial(srv) != first, interval=0.5, what="the serving certificate to be renewed")
            # The connection opened before the rotation still works.
            stub.CreateCertificate(req(), metadata=md, timeout=10)
        assert "renewal failed" not in srv.log()


def test_dev_state_is_reused_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "s"
    with running_dev_server(state):
        root1 = (state / "root-cert.pem").read_bytes()
    key_mode = (state / "ca" / "ca-key.pem").stat().st_mode & 0o777
    with running_dev_server(state):
        assert (state / "root-cert.pem").read_bytes() == root1
    assert key_mode == 0o600
    assert (state / "jwt-signing-key.pem").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_insecure_listener_only_when_asked(tmp_path: Path, transport: str) -> None:
    from tests.support.dev_server import free_port

    port = free_port()
    args = ("--insecure-grpc-listen", f"127.0.0.1:{port}", "--grpc-transport", transport)
    with running_dev_server(tmp_path / "s", *args) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert "INSECURE plaintext gRPC listener" in srv.log()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_multiple_workers_share_the_port_and_stop_cleanly(tmp_path: Path, transport: str) -> None:
    with running_dev_server(tmp_path / "s", "--grpc-transport", transport, workers=2) as srv:
        token = srv.token("default", "sleep")
        for _ in range(8):  # separate channels → separate connections, spread by the kernel
            assert len(_call(srv, GOOD_CSR(), token).cert_chain) == 2
        proc = srv.proc
    assert proc.returncode == 0


def test_dev_mode_refuses_non_loopback(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            *CSR_SERVICE,
            "serve",
            "--dev",
            "--state-dir",
            str(tmp_path / "s"),
            "--grpc-listen",
            "0.0.0.0:16999",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "--grpc-listen" in res.stderr
    assert "loopback" in res.stderr


def test_help_lists_options() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "csr_service", "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0
    assert "--max-certificate-duration" in res.stdout
    assert "CSR_SERVICE_MAX_CERTIFICATE_DURATION" in res.stdout


def test_ca_rotation_reaches_requests_and_serving_cert_without_restart(tmp_path: Path) -> None:
    from tests.support.certs import write_ca_dir

    state = tmp_path / "s"
    with running_dev_server(state, "--local-ca-reload-interval", "1s") as srv:
        token = srv.token("default", "sleep")
        old_roots = load_certs(_call(srv, GOOD_CSR(), token).cert_chain[-1].encode())
        # A broken CA is refused; the last good one keeps signing.
        (state / "ca" / "ca-key.pem").write_text("not a key")
        wait_for(lambda: "keeping the last good CA" in srv.log(), what="the reload to refuse the broken CA")
        assert load_certs(_call(srv, GOOD_CSR(), token).cert_chain[-1].encode()) == old_roots
        # Rotate to a new CA (with an intermediate) while the bundle still carries the old
        # root, as a real rotation does: new leaves chain to the new root, both are trusted.
        _, _, new_root = write_ca_dir(state / "ca", intermediate=True)
        with (state / "ca" / "root-cert.pem").open("a") as fh:
            fh.write("".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in old_roots))

        def rotated() -> ca_pb2.IstioCertificateResponse | None:
            resp = _call(srv, GOOD_CSR(), token)
            return resp if len(resp.cert_chain) == 3 and len(load_certs(resp.cert_chain[-1].encode())) == 2 else None

        resp = wait_for(rotated, timeout=20, interval=0.5, what="leaves from the rotated CA")
        assert load_certs(resp.cert_chain[-1].encode()) == [new_root, *old_roots]
        assert len(resp.cert_chain) == 3  # leaf, intermediate, root bundle
        # Dev mode republishes the bundle file, like the root ConfigMap in a cluster.
        assert load_certs(srv.root_cert.read_bytes()) == [new_root, *old_roots]
        # The serving certificate follows: a client trusting only the new root connects.
        (tmp_path / "new-root.pem").write_bytes(new_root.public_bytes(serialization.Encoding.PEM))
        ctx = ssl.create_default_context(cafile=str(tmp_path / "new-root.pem"))

        def handshake_with_new_root() -> bool:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
                ctx.wrap_socket(raw, server_hostname="localhost").close()
            return True

        wait_for(
            handshake_with_new_root,
            timeout=15,
            interval=0.5,
            what="the serving certificate to move to the new root",
            ignoring=(ssl.SSLError,),
        )


def _glibc_tunables(pid: int) -> str | None:
    """GLIBC_TUNABLES as the process ``pid`` was started with. glibc, parsing it at start, writes
    a NUL over each ':' of the original (which /proc shows): the pieces are joined again."""
    items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    for i, item in enumerate(items):
        if item.startswith("GLIBC_TUNABLES="):
            pieces = [item.removeprefix("GLIBC_TUNABLES=")]
            pieces += itertools.takewhile(lambda x: x.startswith("glibc."), items[i + 1 :])
            return ":".join(pieces)
    return None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", f"glibc.malloc.tcache_count={TCACHE_COUNT}"),  # "" as unset, whatever runs the tests has
        ("glibc.malloc.mxfast=0", f"glibc.malloc.mxfast=0:glibc.malloc.tcache_count={TCACHE_COUNT}"),
        ("glibc.malloc.tcache_count=7", "glibc.malloc.tcache_count=7"),  # the operator's choice is kept
    ],
)
def test_the_service_and_its_workers_run_with_the_malloc_tunable(tmp_path: Path, given: str, expected: str) -> None:
    # glibc reads GLIBC_TUNABLES at process start only: `serve` restarts itself once with it
    # (csr_service/infra/malloc.py), in the same process (exec), and the workers inherit it.
    with running_dev_server(tmp_path / "s", env={"GLIBC_TUNABLES": given}, workers=2) as srv:
        token = srv.token("default", "sleep")
        assert len(_call(srv, GOOD_CSR(), token).cert_chain) == 2
        supervisor = srv.proc.pid  # the pid the test started: the restart replaced its program only
        workers = [p for p in process_tree(supervisor) if p != supervisor]
        assert len(workers) >= 2, workers
        for pid in (supervisor, *workers):
            assert _glibc_tunables(pid) == expected, pid
