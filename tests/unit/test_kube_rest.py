"""The event-loop Kubernetes calls (``csr_service.kube.rest``) against a scripted apiserver.

The real-apiserver tests (``-m certmanager``) run the same path with client certificates and
ServiceAccount tokens; these pin down what it takes from the ``kubernetes`` configuration
(credentials, refresh hook, rate limit, proxy fallback) and how it reports errors.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from csr_service.common.errors import FailedPreconditionError, ResourceExhaustedError, UnavailableError
from csr_service.kube.client import KubeSettings, new_api_client
from csr_service.kube.rest import KubeAPIError, KubeREST, for_client
from issuers.certmanager.api import api_error
from tests.support.certs import tls_files
from tests.unit.test_httpclient import address, answer, read_request, serve


def _config(host: str, token: str = "t0k3n") -> Any:
    cfg = client.Configuration()
    cfg.host = host
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    return cfg


class _Bucket:
    def __init__(self, wait: float = 0.0) -> None:
        self.wait = wait
        self.taken = 0

    def reserve(self) -> float:
        self.taken += 1
        return self.wait


async def _apiserver(responses: list[tuple[int, dict[str, Any]]], seen: list[tuple[str, dict[str, str], bytes]]) -> Any:
    """Answers each request with the next scripted (status, JSON body), recording what came."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
        while True:
            seen.append(await read_request(reader))
            status, body = responses.pop(0)
            writer.write(answer(status, json.dumps(body).encode(), "Content-Type: application/json"))
            await writer.drain()

    server, _ = await serve(handler)
    return server


def test_calls_carry_the_configured_token_refreshed_every_second() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def main() -> list[dict[str, Any]]:
        server = await _apiserver(
            [(201, {"metadata": {"name": "a"}}), (200, {"status": "Success"}), (200, {"status": "Success"})], seen
        )
        cfg = _config(address(server))
        tokens = iter(["first", "second"])

        def refresh(c: Any) -> None:  # what in-cluster and exec-plugin configurations install
            c.api_key["authorization"] = next(tokens)

        cfg.refresh_api_key_hook = refresh
        bucket = _Bucket()
        rest = KubeREST(cfg, bucket=bucket, timeout=5)
        try:
            out = [await rest.call("POST", "/apis/g/v1/namespaces/ns/things", {"spec": {"x": 1}})]
            rest._auth_read -= 1.0  # a second later: the credentials are read again
            out.append(await rest.call("DELETE", "/apis/g/v1/namespaces/ns/things/a"))
            await rest.call("DELETE", "/apis/g/v1/namespaces/ns/things/a")  # within the second: no re-read
        finally:
            await rest.aclose()
            server.close()
        assert bucket.taken == 3
        return out

    created, deleted = asyncio.run(main())
    assert created == {"metadata": {"name": "a"}}
    assert deleted == {"status": "Success"}
    (post_line, post_headers, post_body), (delete_line, delete_headers, delete_body), (_, again, _) = seen
    assert post_line == "POST /apis/g/v1/namespaces/ns/things HTTP/1.1"
    assert post_headers["authorization"] == "Bearer first"
    assert post_headers["content-type"] == "application/json"
    assert json.loads(post_body) == {"spec": {"x": 1}}
    assert delete_line == "DELETE /apis/g/v1/namespaces/ns/things/a HTTP/1.1"
    assert delete_headers["authorization"] == "Bearer second"
    assert delete_body == b""
    assert again["authorization"] == "Bearer second"


def test_basic_auth_from_the_configuration() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def main() -> None:
        server = await _apiserver([(200, {})], seen)
        cfg = client.Configuration()
        cfg.host = address(server)
        cfg.username, cfg.password = "admin", "secret"
        rest = KubeREST(cfg, bucket=None, timeout=5)
        try:
            await rest.call("DELETE", "/x")
        finally:
            await rest.aclose()
            server.close()

    asyncio.run(main())
    assert seen[0][1]["authorization"] == "Basic YWRtaW46c2VjcmV0"


def test_rate_limit_wait_is_slept_on_the_event_loop() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []
    slept: list[float] = []

    async def main() -> None:
        server = await _apiserver([(200, {})], seen)
        rest = KubeREST(_config(address(server)), bucket=_Bucket(wait=0.02), timeout=5)
        real_sleep = asyncio.sleep

        async def sleep(delay: float) -> None:
            slept.append(delay)
            await real_sleep(0)

        asyncio.sleep = sleep  # type: ignore[assignment]
        try:
            await rest.call("DELETE", "/x")
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]
            await rest.aclose()
            server.close()

    asyncio.run(main())
    assert slept == [0.02]
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("status", "reason", "error", "words"),
    [
        (403, "Forbidden", FailedPreconditionError, "grant verb 'create'"),
        (404, "NotFound", FailedPreconditionError, "is cert-manager installed"),
        (422, "Invalid", FailedPreconditionError, "cert-manager rejected the CertificateRequest"),
        (429, "TooManyRequests", ResourceExhaustedError, "rate limiting"),
        (503, "ServiceUnavailable", UnavailableError, "unavailable"),
    ],
)
def test_error_status_is_classified_like_the_kubernetes_client(
    status: int, reason: str, error: type, words: str
) -> None:
    status_body = {"kind": "Status", "status": "Failure", "reason": reason, "message": "nope", "code": status}

    async def main() -> KubeAPIError:
        server = await _apiserver([(status, status_body)], [])
        rest = KubeREST(_config(address(server)), bucket=None, timeout=5)
        try:
            with pytest.raises(KubeAPIError) as info:
                await rest.call("POST", "/x", {})
            return info.value
        finally:
            await rest.aclose()
            server.close()

    exc = asyncio.run(main())
    assert (exc.status, exc.reason) == (status, reason)
    assert '"message": "nope"' in exc.body
    classified = api_error(exc, verb="create", namespace="istio-system")
    assert isinstance(classified, error)
    assert words in classified.public


def test_unreachable_apiserver_is_unavailable() -> None:
    async def main() -> BaseException:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        host = address(server)
        server.close()
        await server.wait_closed()
        rest = KubeREST(_config(host), bucket=None, timeout=5)
        try:
            with pytest.raises(ConnectionError) as info:
                await rest.call("DELETE", "/x")
            return info.value
        finally:
            await rest.aclose()

    exc = asyncio.run(main())
    assert "cannot connect to the Kubernetes API" in str(exc)
    assert isinstance(api_error(exc, verb="delete", namespace="ns"), UnavailableError)


def test_https_with_the_configured_ca_and_client_certificate(tmp_path: Path) -> None:
    """The context urllib3 would build: the kubeconfig's CA bundle, client cert, tls-server-name."""
    ca, cert, key = tls_files(tmp_path, dns_names=("kube.test",), ip_addresses=())  # DNS kube.test only
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.load_verify_locations(ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the apiserver's client-certificate authentication
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def main() -> dict[str, Any]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: dict[str, int]) -> None:
            seen.append(await read_request(reader))
            peer = writer.get_extra_info("peercert")  # verified against ca, so it is our client certificate
            writer.write(answer(200, json.dumps({"client": peer["subjectAltName"]}).encode()))
            await writer.drain()

        server, _ = await serve(handler, server_ctx)
        cfg = _config(address(server, "https"))
        cfg.ssl_ca_cert = str(ca)
        cfg.cert_file, cfg.key_file = str(cert), str(key)
        cfg.tls_server_name = "kube.test"  # the address is an IP the certificate does not name
        rest = KubeREST(cfg, bucket=None, timeout=5)
        try:
            return await rest.call("DELETE", "/x")
        finally:
            await rest.aclose()
            server.close()

    assert asyncio.run(main()) == {"client": [["DNS", "kube.test"]]}


def _kubeconfig(tmp_path: Path, server: str = "https://127.0.0.1:6443") -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "abc"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def _settings(kubeconfig: Path) -> KubeSettings:
    return KubeSettings(
        kubeconfig=str(kubeconfig), context=None, qps=50, burst=100, request_timeout=timedelta(seconds=7)
    )


def test_for_client_shares_the_clients_configuration_and_bucket(tmp_path: Path) -> None:
    api = new_api_client(_settings(_kubeconfig(tmp_path)))
    rest = for_client(api)
    assert rest is not None
    assert rest._bucket is api.bucket
    assert rest._cfg is api.configuration
    assert rest._http._timeout == 7
    assert rest._http._ssl is not None
    assert rest._http._ssl.verify_mode == ssl.CERT_NONE  # insecure-skip-tls-verify


def test_for_client_steps_aside_for_proxies_and_foreign_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert for_client(client.ApiClient(client.Configuration())) is None  # not ours (a test's client)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert for_client(new_api_client(_settings(_kubeconfig(tmp_path)))) is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert for_client(new_api_client(_settings(_kubeconfig(tmp_path)))) is not None


def test_exec_credential_plugin_is_rerun_when_its_token_expires(tmp_path: Path) -> None:
    """A kubeconfig ``exec`` plugin (EKS, GKE, AKS logins): its token reaches the event-loop
    path, and an expired one is replaced by running the plugin again."""
    counter = tmp_path / "runs"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        "                  'status': {'token': f'exec-{n}', 'expirationTimestamp': '2000-01-01T00:00:00Z'}}))\n"
    )
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def main() -> None:
        server = await _apiserver([(200, {}), (200, {}), (200, {})], seen)
        kubeconfig = tmp_path / "kubeconfig"
        user = {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": sys.executable,
                "args": [str(plugin)],
                "interactiveMode": "Never",
            }
        }
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": address(server)}}],
                    "users": [{"name": "u", "user": user}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        rest = for_client(new_api_client(_settings(kubeconfig)))
        assert rest is not None
        try:
            await rest.call("DELETE", "/x")
            await rest.call("DELETE", "/x")  # within the second: the same credentials
            rest._auth_read -= 1.0
            await rest.call("DELETE", "/x")  # later: the expired token makes the plugin run again
        finally:
            await rest.aclose()
            server.close()

    asyncio.run(main())
    tokens = [headers["authorization"] for _, headers, _ in seen]
    assert tokens[0] == tokens[1]
    assert tokens[0].startswith("Bearer exec-")
    assert tokens[2] == f"Bearer exec-{int(tokens[0].rsplit('-', 1)[1]) + 1}"
