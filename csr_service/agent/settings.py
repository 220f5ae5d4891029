"""The agent's flags and their validated, frozen settings.

Flag names follow ``csr-service request`` and istio-agent; gen-istio-cert's names are aliases
(``--cluster-name``, ``--sa-name``, ``--sa-namespace``, ``--output-secret``,
``--output-secret-ns``, ``--leader-election-id``), so its manifests need only the image changed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from csr_service.common.durations import parse_duration
from csr_service.common.errors import ConfigError
from csr_service.common.identity import service_account_from_username
from csr_service.pki.keys import KeyType

__all__ = ["AgentSettings", "SecretTarget", "add_arguments", "token_identity"]

_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
KEY_TYPES = ("rsa2048", "ec-p256", "ec-p384")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``agent`` subcommand's flags (defaults as istio-agent / a pod expects them)."""
    ident = p.add_argument_group("identity and CA")
    ident.add_argument(
        "--ca-address",
        default="istiod.istio-system.svc:15012",
        metavar="HOST:PORT",
        help="the Istio CA: istiod, or csr-service (<service>.<namespace>.svc:443) "
        "(default: istiod.istio-system.svc:15012)",
    )
    ident.add_argument(
        "--root-cert",
        default="/var/run/secrets/istio/root-cert.pem",
        metavar="FILE",
        help="roots that verify the CA's TLS certificate (the istio-ca-root-cert ConfigMap mount); re-read on change",
    )
    ident.add_argument(
        "--token-file",
        default="/var/run/secrets/tokens/istio-token",
        metavar="FILE",
        help="projected service-account token (audience istio-ca), re-read for every request",
    )
    ident.add_argument(
        "--trust-domain", default="cluster.local", help="of the SPIFFE identity (default: cluster.local)"
    )
    ident.add_argument(
        "--cluster-id",
        "--cluster-name",
        dest="cluster_id",
        default="Kubernetes",
        help="sent as clusterid metadata (default: Kubernetes)",
    )
    ident.add_argument(
        "--namespace", "--sa-namespace", dest="namespace", default=None, help="default: from the token's claims"
    )
    ident.add_argument(
        "--service-account", "--sa-name", dest="service_account", default=None, help="default: from the token's claims"
    )
    ident.add_argument(
        "--key-type", default="ec-p256", choices=KEY_TYPES, help="default: ec-p256 (a new key every time)"
    )
    ident.add_argument("--ttl", default="24h", help="requested lifetime; the CA may shorten it (default: 24h)")
    ident.add_argument("--tls-server-name", default=None, help="name to check in the CA's certificate (default: host)")
    ident.add_argument("--request-timeout", default="30s", help="bound on one CreateCertificate call (default: 30s)")

    out = p.add_argument_group("outputs (at least one)")
    out.add_argument("--out-dir", default=None, metavar="DIR", help="write cert-chain.pem, key.pem, root-cert.pem here")
    out.add_argument(
        "--tls-secret-layout", action="store_true", help="also write tls.crt, tls.key, ca.crt in --out-dir"
    )
    out.add_argument("--output-secret", default=None, metavar="NAME", help="write a kubernetes.io/tls Secret")
    out.add_argument("--output-secret-ns", default=None, metavar="NS", help="its namespace (default: --namespace)")
    out.add_argument(
        "--leader-election-id",
        default=None,
        metavar="NAME",
        help="the Lease that picks the one replica writing the Secret (default: <service-account>.csr-service-agent)",
    )
    out.add_argument("--lease-duration", default="15s", help="leader election (default: 15s)")
    out.add_argument("--renew-deadline", default="10s", help="leader election (default: 10s)")
    out.add_argument("--retry-period", default="2s", help="leader election (default: 2s)")
    out.add_argument("--kubeconfig", default=None, metavar="FILE", help="default: in-cluster configuration")
    out.add_argument("--once", action="store_true", help="get one certificate, write it, exit (init containers)")

    rot = p.add_argument_group("rotation")
    rot.add_argument("--renew-at", default="0.5", help="fraction of the lifetime at which to renew (default: 0.5)")
    rot.add_argument("--renew-jitter", default="0.1", help="renew up to this share earlier, at random (default: 0.1)")
    rot.add_argument(
        "--check-interval", default="10s", help="how often outputs and the root file are checked (default: 10s)"
    )
    rot.add_argument("--backoff-initial", default="1s", help="first retry after a failure (default: 1s)")
    rot.add_argument("--backoff-max", default="60s", help="cap of the exponential backoff (default: 60s)")
    rot.add_argument("--on-rotate", default=None, metavar="COMMAND", help="run after each write (no shell)")
    rot.add_argument("--signal-pid-file", default=None, metavar="FILE", help="send --signal to this pid after a write")
    rot.add_argument("--signal", default="HUP", help="signal name for --signal-pid-file (default: HUP)")

    ops = p.add_argument_group("operations")
    ops.add_argument(
        "--http-listen", default="0.0.0.0:15021", help="/healthz, /readyz, /metrics (default: 0.0.0.0:15021; '' = off)"
    )
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info")
    ops.add_argument("--log-format", default="text", choices=["text", "json"], help="default: text")


@dataclass(frozen=True, slots=True)
class SecretTarget:
    namespace: str
    name: str
    lease_name: str
    identity: str  # who we are in the Lease and in the Secret's written-by annotation
    lease_duration: timedelta
    renew_deadline: timedelta
    retry_period: timedelta
    kubeconfig: str | None


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything the agent runs with (no token or key in here: they are read when used)."""

    ca_address: str
    root_cert: Path
    token_file: Path
    trust_domain: str
    cluster_id: str
    namespace: str
    service_account: str
    key_type: KeyType
    ttl: timedelta
    tls_server_name: str | None
    request_timeout: float
    out_dir: Path | None
    tls_secret_layout: bool
    secret: SecretTarget | None
    once: bool
    renew_at: float
    renew_jitter: float
    check_interval: float
    backoff_initial: float
    backoff_max: float
    on_rotate: str | None
    signal_pid_file: Path | None
    signal: signal.Signals
    http_listen: str
    log_level: str
    log_format: str

    @property
    def identity(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> AgentSettings:
        """Validate; raise ConfigError naming the flag. Reads the token's claims (not its
        signature: the CA checks that) to default and cross-check namespace/service account."""
        token_file = Path(a.token_file)
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file: cannot read {token_file}: {exc.strerror}") from exc
        try:
            tok_ns, tok_sa = token_identity(token)
        except ValueError as exc:
            raise ConfigError(f"--token-file: {exc}") from exc
        namespace = a.namespace or tok_ns
        service_account = a.service_account or tok_sa
        if (namespace, service_account) != (tok_ns, tok_sa):
            raise ConfigError(
                f"--namespace/--service-account: {namespace}/{service_account} does not match the token in "
                f"{token_file}, which is for {tok_ns}/{tok_sa}; the CA would refuse every request"
            )
        root = Path(a.root_cert)
        if not root.is_file():
            raise ConfigError(f"--root-cert: {root} is not a readable file")
        if not a.out_dir and not a.output_secret:
            raise ConfigError("no output: give --out-dir and/or --output-secret")
        secret = None
        if a.output_secret:
            secret = _secret_target(a, namespace, service_account)
        sig_name = a.signal.upper().removeprefix("SIG")
        try:
            sig = signal.Signals[f"SIG{sig_name}"]
        except KeyError:
            raise ConfigError(f"--signal: unknown signal {a.signal!r}") from None
        renew_at = _fraction("--renew-at", a.renew_at, low=0.05, high=0.95)
        jitter = _fraction("--renew-jitter", a.renew_jitter, low=0.0, high=0.5)
        backoff_initial = _seconds("--backoff-initial", a.backoff_initial)
        backoff_max = _seconds("--backoff-max", a.backoff_max)
        if backoff_max < backoff_initial:
            raise ConfigError("--backoff-max: must be at least --backoff-initial")
        return cls(
            ca_address=_address(a.ca_address),
            root_cert=root,
            token_file=token_file,
            trust_domain=a.trust_domain,
            cluster_id=a.cluster_id,
            namespace=namespace,
            service_account=service_account,
            key_type=KeyType(a.key_type),
            ttl=timedelta(seconds=_seconds("--ttl", a.ttl)),
            tls_server_name=a.tls_server_name or None,
            request_timeout=_seconds("--request-timeout", a.request_timeout),
            out_dir=Path(a.out_dir) if a.out_dir else None,
            tls_secret_layout=bool(a.tls_secret_layout),
            secret=secret,
            once=bool(a.once),
            renew_at=renew_at,
            renew_jitter=jitter,
            check_interval=_seconds("--check-interval", a.check_interval),
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            on_rotate=a.on_rotate or None,
            signal_pid_file=Path(a.signal_pid_file) if a.signal_pid_file else None,
            signal=sig,
            http_listen=a.http_listen,
            log_level=a.log_level,
            log_format=a.log_format,
        )


def _secret_target(a: argparse.Namespace, namespace: str, service_account: str) -> SecretTarget:
    ns = a.output_secret_ns or namespace
    for flag, value in (("--output-secret", a.output_secret), ("--output-secret-ns", ns)):
        if not _DNS1123.fullmatch(value) or len(value) > 253:
            raise ConfigError(f"{flag}: {value!r} is not a valid Kubernetes name")
    lease = a.leader_election_id or f"{service_account}.csr-service-agent"
    if not _DNS1123.fullmatch(lease):
        raise ConfigError(f"--leader-election-id: {lease!r} is not a valid Kubernetes name")
    durations = {
        f: _seconds(f, getattr(a, f[2:].replace("-", "_")))
        for f in ("--lease-duration", "--renew-deadline", "--retry-period")
    }
    if not durations["--retry-period"] < durations["--renew-deadline"] < durations["--lease-duration"]:
        raise ConfigError("leader election: need --retry-period < --renew-deadline < --lease-duration")
    # The pod name when the Downward API gives it, plus a random part: two processes in one pod
    # (or a restarted container) never share an identity.
    who = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"
    return SecretTarget(
        namespace=ns,
        name=a.output_secret,
        lease_name=lease,
        identity=who,
        lease_duration=timedelta(seconds=durations["--lease-duration"]),
        renew_deadline=timedelta(seconds=durations["--renew-deadline"]),
        retry_period=timedelta(seconds=durations["--retry-period"]),
        kubeconfig=a.kubeconfig,
    )


def _seconds(flag: str, text: str) -> float:
    try:
        value = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from exc
    if value <= 0:
        raise ConfigError(f"{flag}: must be positive")
    return value


def _fraction(flag: str, text: str, *, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag}: not a number: {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{flag}: must be between {low} and {high}, got {value}")
    return value


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ca-address: expected HOST:PORT, got {text!r}")
    return text


def token_identity(token: str) -> tuple[str, str]:
    """(namespace, service account) a Kubernetes service-account token is for, from its claims.

    Unverified on purpose: the CA verifies the token; the agent only needs to know whose it is
    to build the CSR and to refuse a mismatch at start instead of failing every request.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT (a projected service-account token has three dot-separated parts)")
    try:
        claims: Any = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("the token's claims are not base64url JSON") from exc
    if not isinstance(claims, dict):
        raise ValueError("the token's claims are not a JSON object")
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict) and isinstance(k8s.get("serviceaccount"), dict):
        ns, sa = k8s.get("namespace"), k8s["serviceaccount"].get("name")
        if isinstance(ns, str) and isinstance(sa, str):
            return ns, sa
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise ValueError("the token names no service account (no kubernetes.io claim, no sub)")
    return service_account_from_username(sub)
