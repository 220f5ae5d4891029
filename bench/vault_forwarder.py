"""The cheapest gRPC front for Vault's sign call: what the transport alone costs.

    python -m bench.vault_forwarder --listen 127.0.0.1:PORT --cert C --key K \\
        --vault-address http://... --vault-token-file F --role spiffe [--workers 2]

Used by ``bench.vault`` as a second reference next to the direct hvac ceiling: a grpc.aio
server (TLS, SO_REUSEPORT workers, like csr-service) whose CreateCertificate does nothing but
forward the CSR to ``pki/sign/<role>`` over csr-service's own HTTP client and return
``[certificate, issuing_ca]``. No authentication, no CSR checks, no chain verification, no
metrics: NOT a CA anyone should run; it exists to show what share of the ceiling any gRPC
front end built on grpcio reaches on this machine before doing any of a CA's work.

Prints ``ready`` on stdout once every worker listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import sys
from pathlib import Path
from typing import Any

import grpc

from csr_service._generated import ca_pb2, ca_pb2_grpc
from csr_service.infra.httpclient import AsyncHTTP
from csr_service.service.supervisor import die_with_parent


class _Forwarder(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, http: AsyncHTTP, token: str, role: str, uri: str) -> None:
        self._http = http
        self._headers = {"X-Vault-Token": token, "X-Vault-Request": "true", "Content-Type": "application/json"}
        self._path = f"/v1/pki/sign/{role}"
        self._uri = uri

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        body = {
            "csr": request.csr,
            "common_name": "",
            "exclude_cn_from_sans": True,
            "ttl": f"{request.validity_duration or 3600}s",
            "uri_sans": self._uri,
        }
        answer = await self._http.request("POST", self._path, self._headers, json.dumps(body).encode())
        if answer.status != 200:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Vault answered {answer.status}")
        data = json.loads(answer.body)["data"]
        return ca_pb2.IstioCertificateResponse(cert_chain=[data["certificate"], data["issuing_ca"]])


def _worker(args: argparse.Namespace, ready: multiprocessing.connection.Connection) -> None:
    # Killing the launcher (what bench.vault does) must take its workers along: daemonic
    # children are only reaped on a normal exit, so without this they outlived every run.
    die_with_parent()
    token = Path(args.vault_token_file).read_text().strip()
    creds = grpc.ssl_server_credentials([(Path(args.key).read_bytes(), Path(args.cert).read_bytes())])

    async def serve() -> None:
        http = AsyncHTTP(args.vault_address, max_connections=64, timeout=10.0, peer="Vault")
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Forwarder(http, token, args.role, args.uri), server
        )
        server.add_secure_port(args.listen, creds)
        await server.start()
        ready.send("ready")
        await server.wait_for_termination()

    asyncio.run(serve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--vault-address", required=True)
    ap.add_argument("--vault-token-file", required=True)
    ap.add_argument("--role", required=True)
    ap.add_argument("--uri", required=True, help="the URI SAN to ask for (what csr-service would send)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for _ in range(args.workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(args, child), daemon=True)
        proc.start()
        procs.append((proc, parent))
    for proc, parent in procs:
        if not parent.poll(60) or parent.recv() != "ready":
            sys.exit(f"forwarder worker {proc.pid} did not start")
    print("ready", flush=True)
    for proc, _ in procs:
        proc.join()


if __name__ == "__main__":
    main()
