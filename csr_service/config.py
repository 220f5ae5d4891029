"""The one typed, validated configuration, built once at start-up.

Every setting is declared as an :class:`~csr_service.common.options.Option`: here for the
core (transport, pipeline, Kubernetes access, controllers, which plugins to use), and by each
plugin for itself (issuers, authenticators: see :mod:`csr_service.plugins.registry`).
:func:`resolve` merges flags, environment and config file; :meth:`Config.from_values`
validates the core's values and hands each selected plugin exactly the values of the options
it declares. Errors name the flag, so the operator knows exactly what to fix.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from csr_service.common.durations import parse_duration
from csr_service.common.errors import ConfigError
from csr_service.common.options import Option
from csr_service.controllers.options import CONTROLLER_OPTIONS, SIGNER_OPTIONS, TRUST_SOURCE_OPTIONS
from csr_service.controllers.settings import ControllerSettings
from csr_service.kube.client import KubeSettings
from csr_service.kube.clusters import MulticlusterSettings
from csr_service.pki.keys import KeyType
from csr_service.plugins.registry import AUTHENTICATORS, ISSUERS, Kind, find, kind_options, plugin_values
from csr_service.plugins.runtime import Runtime

__all__ = ["CORE_OPTIONS", "Config", "PipelineConfig", "PluginChoice", "ServerConfig", "all_options", "resolve"]

CORE_OPTIONS: list[Option] = [
    # --- general / dev
    Option(
        "config",
        "TOML file with settings; keys are the flag names without the leading dashes.",
        "",
        kind="path",
    ),
    Option(
        "dev",
        "Zero-config local run: generate a root CA and JWT key in --state-dir, listen on 127.0.0.1 only.",
        False,
        kind="bool",
    ),
    Option("state-dir", "Where --dev keeps its CA, JWT key and trust bundle.", ".dev-state", kind="path"),
    Option("log-level", "Log level: debug, info, warning, error.", "info"),
    Option("log-format", "Log format: text or json.", "text"),
    # --- gRPC transport
    Option(
        "grpc-listen",
        "Address of the TLS gRPC listener. Empty: no gRPC service (e.g. only the Kubernetes CSR signer; "
        "then no authenticator is needed).",
        "0.0.0.0:6443",
        group="server",
        metavar="HOST:PORT",
    ),
    Option(
        "insecure-grpc-listen",
        "INSECURE: also serve gRPC in plaintext on this address (tokens travel in the clear). Empty: off.",
        "",
        group="server",
        metavar="HOST:PORT",
    ),
    Option(
        "client-cert-grpc-listen",
        "Address of a second TLS gRPC listener that requires a client certificate chaining to the trust "
        "bundle (mTLS), for callers that authenticate with the certificate they hold (--authenticators "
        "client-cert,...; istio-agent's PROV_CERT). Empty: off. See docs/kubernetes.md.",
        "",
        group="server",
        metavar="HOST:PORT",
    ),
    Option(
        "grpc-transport",
        "gRPC server implementation: native (csr-service's own HTTP/2 server on asyncio: a quarter of "
        "grpcio's CPU per call, every refusal RESOURCE_EXHAUSTED), grpcio (gRPC core), or auto: native, "
        "unless --client-cert-grpc-listen is set (only grpcio serves that listener). See docs/performance.md.",
        "auto",
        group="server",
    ),
    Option(
        "workers",
        "gRPC worker processes sharing the port (SO_REUSEPORT); 0 means one per available CPU.",
        0,
        group="server",
        kind="int",
    ),
    Option(
        "serving-dns-names",
        "DNS names in the serving certificate (the host part of Istio's caAddress).",
        ("csr-service.cert-manager.svc",),
        group="server",
        kind="list",
    ),
    Option("serving-ip-addresses", "IP addresses in the serving certificate.", (), group="server", kind="list"),
    Option(
        "serving-certificate-duration",
        "Lifetime of the serving certificate; renewed when a third of it is left.",
        timedelta(hours=1),
        group="server",
        kind="duration",
    ),
    Option(
        "serving-key-type",
        "Serving key: rsa2048, rsa3072, rsa4096, ec-p256, ec-p384.",
        "ec-p256",
        group="server",
    ),
    Option(
        "request-timeout",
        "Server-side deadline for one CreateCertificate call (Istio sends none).",
        timedelta(seconds=10),
        group="server",
        kind="duration",
    ),
    Option(
        "max-concurrent-requests",
        "CreateCertificate calls in progress per worker; above it new calls get RESOURCE_EXHAUSTED at once "
        "(istio-agent retries with backoff). See docs/operations.md, Overload.",
        128,
        group="server",
        kind="int",
    ),
    Option(
        "max-queued-requests",
        "Calls gRPC may hold per worker before the worker picks them up; above half of it a growing share "
        "of new calls is refused, at it all (clients see CANCELLED and retry). Bounds queueing delay to "
        "about this many CSRs' work.",
        128,
        group="server",
        kind="int",
    ),
    Option(
        "max-queue-wait",
        "A call queued longer than this (whole seconds) is dropped when the worker next picks up a call "
        "(clients see CANCELLED and retry); bounds a stalled worker.",
        timedelta(seconds=1),
        group="server",
        kind="duration",
    ),
    Option(
        "max-connections",
        "Open connections per worker (including ones still in the TLS handshake); more are closed at once. "
        "0: no limit.",
        2048,
        group="server",
        kind="int",
    ),
    Option(
        "max-connection-idle",
        "Close a connection (HTTP/2 GOAWAY; clients reconnect on their next call) after this long without "
        "calls. 0: never.",
        timedelta(minutes=5),
        group="server",
        kind="duration",
    ),
    Option(
        "max-connection-age",
        "Close a connection (GOAWAY, calls in progress get --request-timeout plus 5s to finish) after this "
        "long, so connections rebalance across replicas. 0: never.",
        timedelta(minutes=30),
        group="server",
        kind="duration",
    ),
    Option(
        "tls-handshake-timeout",
        "Close a connection that has not completed the TLS handshake and sent its HTTP/2 settings in this time.",
        timedelta(seconds=10),
        group="server",
        kind="duration",
    ),
    Option(
        "http-listen",
        "Address of the plain-HTTP listener for /livez, /readyz and /metrics (one per replica, all "
        "workers aggregated). Empty: off.",
        "0.0.0.0:9402",
        group="server",
        metavar="HOST:PORT",
    ),
    # --- request pipeline
    Option("trust-domain", "SPIFFE trust domain of the mesh.", "cluster.local", group="pipeline"),
    Option(
        "cluster-id",
        "Cluster id; the clusterid request metadata must be empty or equal to it.",
        "Kubernetes",
        group="pipeline",
    ),
    Option(
        "cluster-id-aliases",
        "Other names of this cluster also accepted in the clusterid metadata (e.g. after a rename).",
        (),
        group="pipeline",
        kind="list",
    ),
    Option(
        "max-certificate-duration",
        "Upper bound on issued workload certificate lifetimes (requests are clamped).",
        timedelta(hours=1),
        group="pipeline",
        kind="duration",
    ),
    Option(
        "default-certificate-duration",
        "Lifetime when a request asks for none (validity_duration <= 0); empty: the maximum.",
        "",
        group="pipeline",
    ),
    Option(
        "per-identity-rate",
        "CreateCertificate calls per second allowed per workload identity (SPIFFE id) and worker; more get "
        "RESOURCE_EXHAUSTED. Stops one crash-looping workload from starving the rest. 0: off.",
        0,
        group="pipeline",
        kind="float",
    ),
    Option(
        "per-identity-burst",
        "Calls one identity may make at once above --per-identity-rate (the token bucket's size).",
        10,
        group="pipeline",
        kind="int",
    ),
    Option(
        "root-ca-file",
        "PEM trust bundle (one or more roots) published to workloads and used to verify every issued "
        "chain. Empty: the local issuer's own roots (other issuers require it).",
        "",
        group="pipeline",
        kind="path",
    ),
    *TRUST_SOURCE_OPTIONS,
    # --- authentication
    Option(
        "authenticator",
        "How callers are authenticated: jwt (keys from --jwt-jwks-file), tokenreview (ask the apiserver; "
        "the in-cluster choice), jwks (the apiserver's published keys), or an installed plugin. "
        "See docs/kubernetes.md. A one-element --authenticators.",
        "jwt",
        group="auth",
    ),
    Option(
        "authenticators",
        "Ordered authenticators, like istiod's (e.g. client-cert,tokenreview): the first that recognises "
        "the call's credential (a client certificate, a bearer token) decides. Empty: --authenticator.",
        (),
        group="auth",
        kind="list",
    ),
    Option(
        "ca-trusted-node-accounts",
        "Node agents (ns/sa, e.g. istio-system/ztunnel) allowed to request certificates for workloads on "
        "their node (Istio's CA_TRUSTED_NODE_ACCOUNTS); empty: impersonation refused.",
        (),
        group="auth",
        kind="list",
    ),
    # --- Kubernetes API access (used by the features that talk to a cluster)
    Option(
        "kubeconfig",
        "Kubeconfig file; empty: in-cluster configuration (service-account token).",
        "",
        group="kubernetes",
        kind="path",
    ),
    Option("kube-context", "Context to use from --kubeconfig; empty: its current context.", "", group="kubernetes"),
    Option(
        "kube-qps",
        "Client-side request rate limit to the apiserver (requests/s); 0 disables the limiter.",
        200,
        group="kubernetes",
        kind="int",
    ),
    Option("kube-burst", "Requests allowed above --kube-qps in a burst.", 400, group="kubernetes", kind="int"),
    Option(
        "kube-request-timeout",
        "Timeout of one non-watch apiserver request.",
        timedelta(seconds=10),
        group="kubernetes",
        kind="duration",
    ),
    # --- multi-cluster (primary-remote / multi-primary meshes with one CA)
    Option(
        "multicluster-secrets",
        "Serve remote clusters too: watch Secrets labelled istio/multiCluster=true in --multicluster-namespace, "
        "in istiod's remote-secret format (each data key a cluster id, its value a kubeconfig: "
        "`istioctl create-remote-secret` output). A workload's clusterid picks the apiserver that reviews its "
        "token (needs tokenreview in --authenticators); root ConfigMaps are kept there too. See docs/multicluster.md.",
        False,
        group="multicluster",
        kind="bool",
    ),
    Option(
        "multicluster-namespace",
        "Namespace of the remote-cluster Secrets (csr-service's own); empty: $POD_NAMESPACE or the "
        "service-account mount's namespace.",
        "",
        group="multicluster",
    ),
    # --- Kubernetes controllers (root ConfigMaps, leader election, istiod-tls, runtime issuer)
    *CONTROLLER_OPTIONS,
    # --- the Kubernetes CSR signer (istiod's EXTERNAL_CA mode)
    *SIGNER_OPTIONS,
    # --- issuer
    Option(
        "issuer",
        "Signing backend: local, vault, cert-manager, or an installed plugin (see docs/plugins.md).",
        "local",
        group="issuer",
    ),
]


def all_options() -> list[Option]:
    """Core options, then every installed authenticator's, then every installed issuer's (each once)."""
    declared: dict[str, Option] = {o.name: o for o in CORE_OPTIONS}
    for opt in (*kind_options(AUTHENTICATORS), *kind_options(ISSUERS)):
        if declared.setdefault(opt.name, opt) != opt:
            raise ConfigError(f"--{opt.name}: declared by a plugin and by the core or another kind of plugin")
    return list(declared.values())


def resolve(
    flag_values: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge flags > environment > config file > defaults into ``{option name: typed value}``.

    ``flag_values`` holds only options actually given on the command line (raw strings or
    already-typed values), keyed by option name. ``defaults`` replaces built-in defaults
    (dev mode uses it), still below every explicit setting.
    """
    defaults = defaults or {}
    env = os.environ if env is None else env
    options = {o.name: o for o in all_options()}
    config_path = flag_values.get("config") or env.get(options["config"].env, "")
    file_values: dict[str, Any] = {}
    if config_path:
        try:
            file_values = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config: cannot read {config_path}: {exc}") from exc
        unknown = sorted(set(file_values) - set(options))
        if unknown:
            raise ConfigError(f"--config: unknown setting(s) in {config_path}: {', '.join(unknown)}")

    values: dict[str, Any] = {}
    for name, opt in options.items():
        source, raw = "default", None
        if name in flag_values:
            source, raw = f"--{name}", flag_values[name]
        elif opt.env in env:
            source, raw = opt.env, env[opt.env]
        elif name in file_values:
            source, raw = f"{name} in {config_path}", file_values[name]
        if raw is None:
            values[name] = defaults.get(name, opt.default)
            continue
        try:
            values[name] = opt.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    return values


def _node_accounts(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Parse ``ns/sa`` entries of --ca-trusted-node-accounts (Istio's CA_TRUSTED_NODE_ACCOUNTS format)."""
    accounts = []
    for entry in values:
        ns, sep, sa = entry.partition("/")
        if not sep or not ns or not sa or "/" in sa:
            raise ConfigError(f"--ca-trusted-node-accounts: expected namespace/serviceaccount, got {entry!r}")
        accounts.append((ns, sa))
    return tuple(accounts)


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--{flag}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (an explicit listen address)


def _check_load_limits(v: Mapping[str, Any]) -> None:
    """The overload and connection limits (docs/operations.md, Overload and Connections)."""
    for flag, least in (("max-concurrent-requests", 1), ("max-queued-requests", 1), ("max-connections", 0)):
        if v[flag] < least:
            raise ConfigError(f"--{flag}: must be >= {least}")
    for flag in ("max-connection-idle", "max-connection-age"):
        if timedelta(0) < v[flag] < timedelta(seconds=1):
            raise ConfigError(f"--{flag}: must be 0 (off) or at least 1s")
    if v["max-queue-wait"] < timedelta(seconds=1):
        raise ConfigError("--max-queue-wait: must be at least 1s (gRPC counts whole seconds)")
    if v["tls-handshake-timeout"] < timedelta(milliseconds=100):
        raise ConfigError("--tls-handshake-timeout: must be at least 100ms")
    if v["per-identity-rate"] < 0:
        raise ConfigError("--per-identity-rate: must be >= 0 (0: off)")
    if v["per-identity-burst"] < 1:
        raise ConfigError("--per-identity-burst: must be >= 1")


def _check_client_cert(v: Mapping[str, Any], authenticators: tuple[PluginChoice, ...]) -> None:
    """The client-cert authenticator and the listener that asks for certificates come together.

    gRPC Python cannot ask for a client certificate without requiring one (its server
    credentials either do not request one or require and verify it), so certificates are
    accepted on a listener of their own; either half alone would be a silent no-op.
    """
    listen = v["client-cert-grpc-listen"]
    wanted = any(a.name == "client-cert" for a in authenticators)
    if listen:
        _host_port(listen, "client-cert-grpc-listen")
        if not wanted:
            raise ConfigError(
                "--client-cert-grpc-listen: add client-cert to --authenticators (e.g. client-cert,tokenreview)"
            )
    elif wanted:
        raise ConfigError(
            "--authenticators client-cert: needs --client-cert-grpc-listen (the listener that asks for certificates)"
        )


def _multicluster(v: Mapping[str, Any], authenticators: tuple[PluginChoice, ...]) -> MulticlusterSettings | None:
    if not v["multicluster-secrets"]:
        return None
    names = [a.name for a in authenticators]
    # Only a TokenReview asks the caller's own cluster; a JWKS file or the local apiserver's keys
    # would accept the clusterid of any remote without checking it. An authenticator listed
    # before tokenreview that also takes bearer tokens would decide instead of it.
    if "tokenreview" not in names or any(n in ("jwt", "jwks") for n in names[: names.index("tokenreview")]):
        raise ConfigError("--multicluster-secrets: needs tokenreview in --authenticators, before jwt and jwks")
    return MulticlusterSettings(namespace=v["multicluster-namespace"])


@dataclass(frozen=True, slots=True)
class ServerConfig:
    grpc_listen: str
    insecure_grpc_listen: str | None
    workers: int
    serving_dns_names: tuple[str, ...]
    serving_ip_addresses: tuple[str, ...]
    serving_certificate_duration: timedelta
    serving_key_type: KeyType
    request_timeout: timedelta
    max_concurrent_requests: int
    http_listen: str | None = None
    max_queued_requests: int = 128
    max_queue_wait: timedelta = timedelta(seconds=1)
    max_connections: int = 2048
    max_connection_idle: timedelta = timedelta(minutes=5)
    max_connection_age: timedelta = timedelta(minutes=30)
    tls_handshake_timeout: timedelta = timedelta(seconds=10)
    #: The mTLS listener (a client certificate required), for ``--authenticators client-cert``.
    client_cert_grpc_listen: str | None = None
    #: "grpcio" (gRPC core) or "native" (csr_service.transport.native).
    grpc_transport: str = "native"


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    trust_domain: str
    cluster_id: str
    max_certificate_duration: timedelta
    default_certificate_duration: timedelta
    root_ca_file: str | None
    cluster_id_aliases: tuple[str, ...] = ()
    #: (namespace, service account) pairs from --ca-trusted-node-accounts (ztunnel impersonation).
    trusted_node_accounts: tuple[tuple[str, str], ...] = ()
    #: Calls per second per identity (0: no limit) and the bucket size.
    per_identity_rate: float = 0.0
    per_identity_burst: int = 10


@dataclass(frozen=True, slots=True)
class PluginChoice:
    """A selected plugin (``--issuer``, ``--authenticator``) and the values of its own options."""

    name: str
    values: Mapping[str, Any] = field(repr=False)

    @classmethod
    def select(cls, kind: Kind, v: Mapping[str, Any], name: str | None = None) -> PluginChoice:
        """The plugin named ``name`` (default: by ``--<kind.flag>``), its values validated by the plugin."""
        plugin = find(kind, v[kind.flag] if name is None else name)
        values = plugin_values(plugin, v)
        plugin.validate(values)
        return cls(plugin.name, values)


def _authenticators(v: Mapping[str, Any]) -> tuple[PluginChoice, ...]:
    """``--authenticators``, or ``--authenticator`` as a list of one (configurations before the list)."""
    names = tuple(v["authenticators"])
    if not names:
        return (PluginChoice.select(AUTHENTICATORS, v),)
    if len(set(names)) != len(names):
        raise ConfigError(f"--authenticators: {', '.join(names)} names one authenticator twice")
    default = next(o.default for o in CORE_OPTIONS if o.name == "authenticator")
    if v["authenticator"] not in (default, *names):
        raise ConfigError(
            f"--authenticator {v['authenticator']} and --authenticators {','.join(names)} disagree; "
            "set only --authenticators"
        )
    return tuple(PluginChoice.select(AUTHENTICATORS, v, name) for name in names)


@dataclass(frozen=True, slots=True)
class Config:
    """Everything csr-service needs to run, validated. Plugins get only their own values."""

    server: ServerConfig
    pipeline: PipelineConfig
    #: ``--authenticators`` in order (``--authenticator`` alone is a list of one); empty when the
    #: gRPC service is off (``--grpc-listen ''``: istiod authenticates for the CSR signer).
    authenticators: tuple[PluginChoice, ...]
    issuer: PluginChoice
    kube: KubeSettings | None = None
    controllers: ControllerSettings | None = None
    #: ``--multicluster-secrets``: remote clusters from Secrets; None: this cluster only.
    multicluster: MulticlusterSettings | None = None
    dev: bool = False
    state_dir: str = ".dev-state"
    log_level: str = "info"
    log_format: str = "text"

    @property
    def authenticator(self) -> PluginChoice | None:
        """The first of :attr:`authenticators` (what ``--authenticator`` selects); None when the
        gRPC service is off."""
        return self.authenticators[0] if self.authenticators else None

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> Config:
        """Validate resolved option values (see :func:`resolve`) and build the config."""
        if v["grpc-listen"]:
            _host_port(v["grpc-listen"], "grpc-listen")
        elif not v["k8s-signer-names"]:
            raise ConfigError("--grpc-listen: empty turns the gRPC service off; then give --k8s-signer-names")
        elif v["insecure-grpc-listen"]:
            raise ConfigError("--insecure-grpc-listen: needs the gRPC service (--grpc-listen)")
        if v["insecure-grpc-listen"]:
            _host_port(v["insecure-grpc-listen"], "insecure-grpc-listen")
        # Without gRPC nobody is authenticated here (istiod authenticates for the CSR signer).
        authenticators = _authenticators(v) if v["grpc-listen"] else ()
        _check_client_cert(v, authenticators)
        if v["http-listen"]:
            _host_port(v["http-listen"], "http-listen")
        workers = v["workers"]
        if workers < 0:
            raise ConfigError("--workers: must be >= 0")
        if workers == 0:
            workers = max(1, len(os.sched_getaffinity(0)))
        if not v["grpc-listen"]:
            workers = 1  # the worker processes share the gRPC port; without it one process does it all
        for ip in v["serving-ip-addresses"]:
            try:
                ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ConfigError(f"--serving-ip-addresses: {exc}") from exc
        try:
            serving_key = KeyType(v["serving-key-type"])
        except ValueError as exc:
            raise ConfigError(
                f"--serving-key-type: {v['serving-key-type']!r}; choose one of {', '.join(k.value for k in KeyType)}"
            ) from exc
        if not v["serving-dns-names"] and not v["serving-ip-addresses"]:
            raise ConfigError("--serving-dns-names/--serving-ip-addresses: the serving certificate needs a name")
        dur = v["serving-certificate-duration"]
        if dur < timedelta(seconds=10):
            raise ConfigError("--serving-certificate-duration: must be at least 10s")
        if v["request-timeout"] <= timedelta(0):
            raise ConfigError("--request-timeout: must be positive")
        _check_load_limits(v)
        max_dur = v["max-certificate-duration"]
        if max_dur < timedelta(minutes=1):
            raise ConfigError("--max-certificate-duration: must be at least 1m")
        default_dur = max_dur
        if v["default-certificate-duration"]:
            try:
                default_dur = parse_duration(v["default-certificate-duration"])
            except ValueError as exc:
                raise ConfigError(f"--default-certificate-duration: {exc}") from exc
            if default_dur <= timedelta(0):
                raise ConfigError("--default-certificate-duration: must be positive")
            default_dur = min(default_dur, max_dur)
        if v["log-format"] not in {"text", "json"}:
            raise ConfigError("--log-format: choose text or json")
        transport = v["grpc-transport"]
        if transport not in {"auto", "grpcio", "native"}:
            raise ConfigError("--grpc-transport: choose auto, native or grpcio")
        if transport == "native" and v["client-cert-grpc-listen"]:
            raise ConfigError("--client-cert-grpc-listen: needs --grpc-transport grpcio (or auto)")
        if transport == "auto":
            transport = "grpcio" if v["client-cert-grpc-listen"] else "native"
        if v["log-level"].lower() not in {"debug", "info", "warning", "error"}:
            raise ConfigError("--log-level: choose debug, info, warning or error")
        return cls(
            server=ServerConfig(
                grpc_listen=v["grpc-listen"],
                insecure_grpc_listen=v["insecure-grpc-listen"] or None,
                workers=workers,
                serving_dns_names=tuple(v["serving-dns-names"]),
                serving_ip_addresses=tuple(v["serving-ip-addresses"]),
                serving_certificate_duration=dur,
                serving_key_type=serving_key,
                request_timeout=v["request-timeout"],
                max_concurrent_requests=v["max-concurrent-requests"],
                http_listen=v["http-listen"] or None,
                max_queued_requests=v["max-queued-requests"],
                max_queue_wait=v["max-queue-wait"],
                max_connections=v["max-connections"],
                max_connection_idle=v["max-connection-idle"],
                max_connection_age=v["max-connection-age"],
                tls_handshake_timeout=v["tls-handshake-timeout"],
                client_cert_grpc_listen=v["client-cert-grpc-listen"] or None,
                grpc_transport=transport,
            ),
            pipeline=PipelineConfig(
                trust_domain=v["trust-domain"],
                cluster_id=v["cluster-id"],
                max_certificate_duration=max_dur,
                default_certificate_duration=default_dur,
                root_ca_file=v["root-ca-file"] or None,
                cluster_id_aliases=tuple(v["cluster-id-aliases"]),
                trusted_node_accounts=_node_accounts(v["ca-trusted-node-accounts"]),
                per_identity_rate=float(v["per-identity-rate"]),
                per_identity_burst=v["per-identity-burst"],
            ),
            authenticators=authenticators,
            issuer=PluginChoice.select(ISSUERS, v),
            kube=KubeSettings.from_values(dict(v)),
            controllers=ControllerSettings.from_values(v),
            multicluster=_multicluster(v, authenticators),
            dev=v["dev"],
            state_dir=v["state-dir"],
            log_level=v["log-level"].lower(),
            log_format=v["log-format"],
        )

    def runtime(self, *, worker_index: int = 0) -> Runtime:
        """The shared things handed to plugins and controllers in one worker process."""
        return Runtime(
            trust_domain=self.pipeline.trust_domain,
            dev=self.dev,
            state_dir=self.state_dir,
            worker_index=worker_index,
            kube_settings=self.kube,
        )
