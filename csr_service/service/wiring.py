"""Wiring: build one worker's service from a :class:`Config`, and start and stop it.

Every part is created here from the frozen Config, in the order requests flow: the plugins
(authenticator, issuer) → the pipeline → the serving certificate → the background
components (trust sources, controllers) → the gRPC listener. How worker processes are run
and supervised is :mod:`csr_service.service.supervisor`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from csr_service.common.errors import (
    ConfigError,
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from csr_service.common.lifecycle import Component, Lifecycle
from csr_service.config import Config
from csr_service.infra.fsutil import write_atomic
from csr_service.kube.clusters import Cluster, ClusterSet
from csr_service.pipeline.authn.chain import AuthenticatorChain
from csr_service.pipeline.handler import CertificatePipeline, IssuerSlot, PipelineSettings
from csr_service.pipeline.impersonation_k8s import node_impersonation
from csr_service.pipeline.ratelimit import IdentityRateLimiter
from csr_service.plugins.authenticator import AuthenticatorAbilities
from csr_service.plugins.issuer import IssuerAbilities
from csr_service.plugins.registry import create_authenticator, create_issuer
from csr_service.plugins.runtime import Runtime
from csr_service.service.components import build_components, trust_from_source
from csr_service.transport.admission import Admission
from csr_service.transport.grpc_server import GrpcLimits, GrpcServer, UnservedCalls
from csr_service.transport.native import NativeGrpcServer
from csr_service.transport.servicer import IstioCertificateServicer
from csr_service.transport.serving_cert import ServingCertificate
from csr_service.trust.bundle import TrustBundle

__all__ = ["Service", "build_service"]

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The assembled, not yet started, service of one worker."""

    config: Config
    runtime: Runtime
    issuers: IssuerSlot
    #: ``--authenticators`` in order; the pipeline asks them through an AuthenticatorChain.
    #: Empty, and pipeline/serving None, when the gRPC service is off (``--grpc-listen ''``).
    authenticators: tuple[AuthenticatorAbilities, ...]
    trust: TrustBundle
    pipeline: CertificatePipeline | None
    serving: ServingCertificate | None
    #: Counts CreateCertificate calls in progress; refuses those above --max-concurrent-requests.
    admission: Admission
    #: Background parts (watches, controllers, ...), started before the gRPC listener opens.
    components: list[Component] = field(default_factory=list)
    server: GrpcServer | NativeGrpcServer | None = None
    unserved: UnservedCalls | None = None
    _started: list[Lifecycle] = field(default_factory=list)

    @property
    def issuer(self) -> IssuerAbilities:
        """The active issuer's abilities (the runtime issuer controller may swap it later)."""
        return self.issuers.active

    async def start(self) -> None:
        """Start the plugins, settle the trust bundle, start components, get a serving cert, listen."""
        issuer = self.issuers.active
        if issuer.lifecycle is not None:
            await _start_issuer(issuer.lifecycle)
            self._started.append(issuer.lifecycle)
        for authenticator in self.authenticators:
            if authenticator.lifecycle is not None:
                await authenticator.lifecycle.start()
                self._started.append(authenticator.lifecycle)
        await _init_trust(self.config, issuer, self.trust)
        for component in self.components:
            if component.all_workers or self.runtime.worker_index == 0:
                await component.start()
                self._started.append(component)
        if self.serving is None or self.pipeline is None:
            log.info("gRPC service off (--grpc-listen is empty)")
            return
        await self.serving.start()
        self._started.append(self.serving)
        server = self.config.server
        servicer = IstioCertificateServicer(
            self.pipeline,
            timeout=server.request_timeout,
            admission=self.admission,
            client_certificates=server.client_cert_grpc_listen is not None,
        )
        limits = GrpcLimits(
            max_queued_requests=server.max_queued_requests,
            max_concurrent_requests=server.max_concurrent_requests,
            max_queue_wait=server.max_queue_wait,
            max_connections=server.max_connections,
            max_connection_idle=server.max_connection_idle,
            max_connection_age=server.max_connection_age,
            # Calls in progress when a connection reaches its age get their full deadline.
            max_connection_age_grace=server.request_timeout + timedelta(seconds=5),
            handshake_timeout=server.tls_handshake_timeout,
        )
        if server.grpc_transport == "native":
            self.server = NativeGrpcServer(
                servicer,
                self.serving,
                listen=server.grpc_listen,
                insecure_listen=server.insecure_grpc_listen,
                limits=limits,
            )
        else:
            self.server = GrpcServer(
                servicer,
                self.serving,
                listen=server.grpc_listen,
                insecure_listen=server.insecure_grpc_listen,
                client_cert_listen=server.client_cert_grpc_listen,
                limits=limits,
            )
            # gRPC core's own queue refusals are invisible to us but for its channelz counters.
            self.unserved = UnservedCalls(server.max_queue_wait, server.max_queued_requests)
        await self.server.start()

    def load(self) -> tuple[int, int | None]:
        """(most calls in progress at once since the last call, calls gRPC never handed over so far)."""
        never_served = self.unserved.sample(self.admission.in_flight) if self.unserved is not None else None
        return self.admission.take_peak(), never_served

    async def stop(self) -> None:
        """Stop listening, then everything started, in reverse order."""
        if self.server is not None:
            await self.server.stop()
        for part in reversed(self._started):
            try:
                await part.stop()
            except Exception:  # stopping must go on for the rest
                log.exception("stopping %s failed", getattr(part, "name", type(part).__name__))
        self._started.clear()


async def _start_issuer(issuer: Lifecycle) -> None:
    """Start the issuer, retrying while its backend is unavailable.

    A backend that is down at start (Vault restarting, apiserver blip) must leave the pod
    running and not ready, retrying, rather than crash-looping into a back-off that outlasts
    the outage (istio-csr #431). Misconfiguration (any other error) still fails fast.
    """
    delay = 1.0
    while True:
        try:
            await issuer.start()
            return
        except (UnavailableError, ResourceExhaustedError, DeadlineExceededError) as exc:
            log.error("issuer not usable yet (retrying in %.0fs): %s", delay, exc.detail)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _init_trust(config: Config, issuer: IssuerAbilities, trust: TrustBundle) -> None:
    if trust_from_source(config):
        return  # a file (loaded in build_service) or a ConfigMap/Secret (its component loads it)
    # Roots an issuer reads from the operator's own configuration (the local CA's files) are
    # trusted as they are; a remote backend's roots would be trust on first use, which needs
    # an explicit choice.
    tofu = config.controllers is not None and config.controllers.trust_roots_from_issuer
    if issuer.roots is None or not (issuer.roots_are_configuration or tofu):
        raise ConfigError(
            f"--root-ca-file: required with --issuer {issuer.name} "
            "(or --root-ca-configmap, --root-ca-secret, --trust-roots-from-issuer)"
        )
    if not issuer.roots_are_configuration:
        log.warning("--trust-roots-from-issuer: trusting the roots %s reports (trust on first use)", issuer.name)
    if config.dev:
        # Dev mode keeps DIR/root-cert.pem current, as the root ConfigMap is in a cluster.
        bundle_file = Path(config.state_dir) / "root-cert.pem"
        trust.add_listener(lambda snapshot: write_atomic(bundle_file, snapshot.pem))
    trust.update(await issuer.roots.roots())
    if issuer.roots_watcher is not None:
        issuer.roots_watcher.add_roots_listener(trust.update)


def build_service(config: Config, *, worker_index: int = 0) -> Service:
    """Construct every part (no I/O beyond reading config files)."""
    runtime = config.runtime(worker_index=worker_index)
    trust = TrustBundle.from_file(config.pipeline.root_ca_file) if config.pipeline.root_ca_file else TrustBundle()
    runtime.trust_roots = lambda: trust.current.roots  # read per call: follows root rotations
    clusters = _cluster_set(config, runtime)
    runtime.clusters = clusters  # before the plugins: tokenreview reviews in the caller's cluster
    slot = IssuerSlot(create_issuer(config.issuer.name, config.issuer.values, runtime))
    if not config.authenticators:  # no gRPC service: the Kubernetes CSR signer alone
        return Service(
            config=config,
            runtime=runtime,
            issuers=slot,
            authenticators=(),
            trust=trust,
            pipeline=None,
            serving=None,
            admission=Admission(config.server.max_concurrent_requests),
            components=build_components(config, runtime, slot, trust, None),
        )
    authenticators = tuple(
        AuthenticatorAbilities.of(create_authenticator(choice.name, choice.values, runtime))
        for choice in config.authenticators
    )
    # ztunnel impersonation: only with --ca-trusted-node-accounts (policy + a pod cache per worker).
    node_policy = node_impersonation(config.pipeline.trusted_node_accounts, runtime)
    rate = config.pipeline.per_identity_rate
    pipeline = CertificatePipeline(
        # One authenticator is asked directly: its own errors, no recognising step.
        authenticator=authenticators[0].authenticator
        if len(authenticators) == 1
        else AuthenticatorChain(authenticators),
        impersonation=node_policy[0] if node_policy else None,
        rate_limit=IdentityRateLimiter(rate, config.pipeline.per_identity_burst) if rate > 0 else None,
        issuers=slot,
        trust=trust,
        settings=PipelineSettings(
            trust_domain=config.pipeline.trust_domain,
            cluster_ids=clusters
            if clusters is not None
            else frozenset({config.pipeline.cluster_id, *config.pipeline.cluster_id_aliases}),
            max_duration=config.pipeline.max_certificate_duration,
            default_duration=config.pipeline.default_certificate_duration,
        ),
    )
    serving = ServingCertificate(
        slot,
        trust,
        dns_names=config.server.serving_dns_names,
        ip_addresses=config.server.serving_ip_addresses,
        duration=config.server.serving_certificate_duration,
        key_type=config.server.serving_key_type,
    )
    return Service(
        config=config,
        runtime=runtime,
        issuers=slot,
        authenticators=authenticators,
        trust=trust,
        pipeline=pipeline,
        serving=serving,
        admission=Admission(config.server.max_concurrent_requests),
        components=[
            # Remote clusters first: known before the listener opens (and before their controllers).
            *_multicluster_components(config, runtime),
            *build_components(config, runtime, slot, trust, serving),
            *([node_policy[1]] if node_policy else []),
        ],
    )


def _cluster_set(config: Config, runtime: Runtime) -> ClusterSet | None:
    """The local cluster and (filled at run time) the remote ones, with ``--multicluster-secrets``."""
    if config.multicluster is None:
        return None
    local = Cluster(config.pipeline.cluster_id, runtime.kube)
    return ClusterSet(local, aliases=config.pipeline.cluster_id_aliases)


def _multicluster_components(config: Config, runtime: Runtime) -> list[Component]:
    if config.multicluster is None or runtime.clusters is None or config.kube is None:
        return []
    from csr_service.kube.remote_secrets import RemoteSecretWatcher

    return [RemoteSecretWatcher(runtime.kube(), runtime.clusters, config.multicluster, config.kube)]
