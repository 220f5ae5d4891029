"""Run Istio's real ``pilot-agent`` (the sidecar agent, without Envoy) as a CA client.

``pilot-agent proxy sidecar`` runs in its own working directory, because Istio's paths are
relative (``./var/run/secrets/tokens/istio-token`` is the token,
``./var/run/secrets/istio/root-cert.pem`` the CA's root when neither ``CA_ROOT_CA`` nor
``PROV_CERT`` names another, ``./var/run/secrets/workload-spiffe-uds/socket`` its SDS socket).
With ``OUTPUT_CERTS=<dir>`` it writes ``cert-chain.pem``, ``key.pem`` and ``root-cert.pem`` there
each time it gets a workload certificate (``security/pkg/nodeagent/cache/secretcache.go``). With
``PROV_CERT=<dir>`` it presents ``<dir>/cert-chain.pem`` + ``<dir>/key.pem`` as its TLS client
certificate to ``CA_ADDR`` and trusts ``<dir>/root-cert.pem`` for it (``pkg/istio-agent/agent.go``
``GetKeyCertsForCA``/``FindRootCAForCA``); a token file that does not exist means no
``authorization`` header at all (``credentialfetcher/plugin/token.go``). See TESTBED.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.install import ensure
from tests.testbed.process import ManagedProcess, free_port


@dataclass
class PilotAgent:
    """A running pilot-agent: its process, working directory and ``OUTPUT_CERTS`` directory."""

    process: ManagedProcess
    workdir: Path
    output_certs: Path

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")


@contextmanager
def run_pilot_agent(
    workdir: Path,
    *,
    ca_address: str,
    namespace: str,
    service_account: str,
    output_certs: Path,
    token: str | None = None,
    root_cert: Path | None = None,
    prov_cert: Path | None = None,
    cluster_id: str = "Kubernetes",
    trust_domain: str = "cluster.local",
    env: Mapping[str, str] | None = None,
) -> Iterator[PilotAgent]:
    """Start ``pilot-agent proxy sidecar`` in ``workdir``; stopped on exit.

    ``ca_address`` must be ``<IP>:<port>`` (with ``localhost`` Istio checks the name
    ``istiod.istio-system.svc``). ``token``: written as its projected token; None: no token
    file. ``root_cert``: the CA's root as the mounted ConfigMap would be. ``prov_cert``: the
    ``PROV_CERT`` directory.
    """
    binary = ensure("pilot-agent")
    workdir.mkdir(parents=True, exist_ok=True)
    if token is not None:
        token_path = workdir / "var/run/secrets/tokens/istio-token"
        token_path.parent.mkdir(parents=True, exist_ok=True)
        token_path.write_text(token)
    if root_cert is not None:
        root_path = workdir / "var/run/secrets/istio/root-cert.pem"
        root_path.parent.mkdir(parents=True, exist_ok=True)
        root_path.write_bytes(root_cert.read_bytes())
    output_certs.mkdir(parents=True, exist_ok=True)
    # No istiod: the discovery address is never dialled without Envoy asking for config.
    proxy_config = f'{{"discoveryAddress":"127.0.0.1:{free_port()}","statusPort":{free_port()}}}'
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "DISABLE_ENVOY": "true",
        "CLOUD_PLATFORM": "none",
        "CA_ADDR": ca_address,
        "CA_PROVIDER": "Citadel",
        "JWT_POLICY": "third-party-jwt",
        "TRUST_DOMAIN": trust_domain,
        "POD_NAME": f"{service_account}-pod",
        "POD_NAMESPACE": namespace,
        "SERVICE_ACCOUNT": service_account,
        "ISTIO_META_CLUSTER_ID": cluster_id,
        "OUTPUT_CERTS": str(output_certs),
        "PROXY_CONFIG": proxy_config,
        **({"PROV_CERT": str(prov_cert)} if prov_cert is not None else {}),
        **(env or {}),
    }
    proc = ManagedProcess(
        f"pilot-agent-{service_account}",
        [binary, "proxy", "sidecar"],
        workdir / "pilot-agent.log",
        env=full_env,
        cwd=workdir,
        grace=5,
    )
    try:
        yield PilotAgent(proc, workdir, output_certs)
    finally:
        proc.stop()
