"""Wiring of ``csr-service agent``: build the CA client, the outputs and their rotators, the
leader election for a Secret, the HTTP side; run until SIGTERM, or once (``--once``).

Files are per replica (every pod has its own ``emptyDir``), so their rotator always runs. A
Secret is shared by all replicas of a Deployment, so only the holder of the Lease writes it:
its rotator is leader-only work of :class:`~csr_service.controllers.leader.LeaderElector` (the
same elector csr-service's controllers use), started when the Lease is won and stopped when it
is lost. A new leader adopts the certificate the previous one wrote if it is still good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from csr_service.agent.ca import CAClient
from csr_service.agent.hooks import Hooks
from csr_service.agent.outputs import FileOutput, Output, SecretOutput
from csr_service.agent.rotator import Policy, Rotator
from csr_service.agent.settings import AgentSettings
from csr_service.client import RequestError
from csr_service.common.errors import ConfigError
from csr_service.common.readiness import Check, ReadinessReport
from csr_service.controllers.leader import LeaderElector, LeaseClient
from csr_service.controllers.settings import LeaderSettings
from csr_service.infra import metrics
from csr_service.transport.http import HttpApp, HttpServer

__all__ = ["run", "run_async"]

log = logging.getLogger(__name__)


def _ca_client(s: AgentSettings) -> CAClient:
    return CAClient(
        address=s.ca_address,
        root_file=s.root_cert,
        token_file=s.token_file,
        identity=s.identity,
        cluster_id=s.cluster_id or None,
        key_type=s.key_type,
        ttl=s.ttl,
        tls_server_name=s.tls_server_name,
        timeout=s.request_timeout,
    )


def _check_out_dir(s: AgentSettings) -> None:
    """Refuse at start an output directory we cannot write (a pod spec error, not a transient one)."""
    if s.out_dir is None:
        return
    try:
        s.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out-dir: cannot create {s.out_dir}: {exc.strerror}") from exc
    if not os.access(s.out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir: {s.out_dir} is not writable by uid {os.getuid()}")


def _kube_api(s: AgentSettings) -> Any:
    from csr_service.kube.client import KubeSettings, new_api_client

    assert s.secret is not None
    return new_api_client(
        KubeSettings(
            kubeconfig=s.secret.kubeconfig, context=None, qps=5, burst=10, request_timeout=timedelta(seconds=10)
        ),
        pool_size=4,
    )


def _outputs(s: AgentSettings, api: Any) -> tuple[FileOutput | None, SecretOutput | None]:
    files = FileOutput(s.out_dir, tls_layout=s.tls_secret_layout) if s.out_dir else None
    secret = None
    if s.secret is not None:
        secret = SecretOutput(api, s.secret.namespace, s.secret.name, identity=s.secret.identity)
    return files, secret


async def _once(s: AgentSettings, outputs: list[Output]) -> int:
    ca = _ca_client(s)
    try:
        for output in outputs:
            issued = await ca.issue()
            await output.write(issued)
            print(
                f"wrote a certificate for {s.identity} to {output.name} "
                f"(valid until {issued.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})",
                flush=True,
            )
    except RequestError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr, flush=True)
        return 1
    finally:
        await ca.close()
    return 0


class _LeaderOnly:
    """The Secret's rotator as leader-only work, with the leader gauge."""

    all_workers = False

    def __init__(self, rotator: Rotator, output: SecretOutput) -> None:
        self.rotator = rotator
        self.output = output
        self.name = rotator.name
        self.leading = False

    async def start(self) -> None:
        self.leading = True
        self.output.active = True
        metrics.AGENT_LEADER.set(1)
        await self.rotator.start()

    async def stop(self) -> None:
        self.leading = False
        self.output.active = False
        metrics.AGENT_LEADER.set(0)
        await self.rotator.stop()


class _Readiness:
    def __init__(self, files: Rotator | None, secret: _LeaderOnly | None, holder: Callable[[], str]) -> None:
        self._files = files
        self._secret = secret
        self._holder = holder

    def report(self) -> ReadinessReport:
        checks: list[Check] = []
        if self._files is not None:
            checks.append(self._files.check())
        if self._secret is not None:
            if self._secret.leading:
                checks.append(self._secret.rotator.check())
            else:
                holder = self._holder() or "nobody yet"
                name = self._secret.rotator.output.name
                checks.append(Check(name, True, f"standby: the Lease is held by {holder}, which writes the Secret"))
        return ReadinessReport(tuple(checks))


async def run_async(s: AgentSettings, *, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); 0 on a clean stop."""
    _check_out_dir(s)
    api = _kube_api(s) if s.secret is not None else None
    files_out, secret_out = _outputs(s, api)
    if s.once:
        return await _once(s, [o for o in (files_out, secret_out) if o is not None])

    ca = _ca_client(s)
    hooks = Hooks(command=s.on_rotate, pid_file=s.signal_pid_file, sig=s.signal)
    after = hooks.after_write if (s.on_rotate or s.signal_pid_file) else None
    policy = Policy(
        renew_at=s.renew_at,
        jitter=s.renew_jitter,
        check_interval=s.check_interval,
        backoff_initial=s.backoff_initial,
        backoff_max=s.backoff_max,
    )
    files = Rotator(files_out, ca, policy, after_write=after) if files_out else None
    secret = _LeaderOnly(Rotator(secret_out, ca, policy, after_write=after), secret_out) if secret_out else None
    elector = None
    lease: LeaseClient | None = None
    if secret is not None and s.secret is not None:
        leader = LeaderSettings(
            namespace=s.secret.namespace,
            lease_name=s.secret.lease_name,
            identity=s.secret.identity,
            lease_duration=s.secret.lease_duration,
            renew_deadline=s.secret.renew_deadline,
            retry_period=s.secret.retry_period,
        )
        lease = LeaseClient(api, leader)
        elector = LeaderElector(lease, leader, [secret], api=api)
    held = lease
    readiness = _Readiness(files, secret, lambda: held.last_holder if held is not None else "")
    http = None
    if s.http_listen:
        app = HttpApp(readiness, lambda: metrics.render(metrics.AGENT_REGISTRY), live_paths=("/healthz", "/livez"))
        http = HttpServer(app, s.http_listen)
        await http.start()
        print(f"csr-service agent: HTTP on port {http.port}", flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "agent for %s: CA %s, outputs %s",
        s.identity,
        s.ca_address,
        ", ".join(o.name for o in (files_out, secret_out) if o is not None),
    )
    try:
        if files is not None:
            await files.start()
        if elector is not None:
            await elector.start()
        await stop.wait()
        log.info("agent stopping")
    finally:
        if elector is not None:
            await elector.stop()
        if files is not None:
            await files.stop()
        if http is not None:
            await http.stop()
        await ca.close()
    return 0


def run(s: AgentSettings) -> int:
    from csr_service.infra.logs import setup_logging

    setup_logging(s.log_level, s.log_format)
    # Quieten the kubernetes client's per-request noise; our own lines say what happened.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    return asyncio.run(run_async(s))
