"""Validated settings of the controllers and trust sources (built by ``Config.from_values``)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from csr_service.common.errors import ConfigError
from csr_service.kube.refs import DNS1123, ObjectRef, parse_object_ref
from csr_service.pki.keys import KeyType

__all__ = ["ControllerSettings", "LeaderSettings", "SignerIssuer", "SignerSettings"]


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    namespace: str
    lease_name: str
    identity: str
    lease_duration: timedelta
    renew_deadline: timedelta
    retry_period: timedelta


@dataclass(frozen=True, slots=True)
class SignerIssuer:
    """The issuer one signer name signs with (a table of ``--k8s-signer-issuers-file``)."""

    backend: str
    values: Mapping[str, Any] = field(repr=False)
    #: Roots its chains must verify against; empty: its own roots when they are configuration
    #: (the local CA's files), else the service's trust bundle.
    root_ca_file: str = ""


@dataclass(frozen=True, slots=True)
class SignerSettings:
    """The Kubernetes CSR signer (``controllers/csr_signer.py``)."""

    #: Exact signer names and ``domain/*`` patterns.
    names: tuple[str, ...]
    requesters: frozenset[str]
    #: signerName -> its issuer; names not here sign with ``--issuer``.
    issuers: Mapping[str, SignerIssuer]
    istiod_signer_names: frozenset[str]
    istiod_dns_names: frozenset[str]
    istiod_max_duration: timedelta
    workers: int

    def serves(self, signer_name: str) -> bool:
        """Whether ``signer_name`` is one of ours (exactly, or under a ``domain/*`` pattern)."""
        for name in self.names:
            if name == signer_name or (name.endswith("/*") and signer_name.startswith(name[:-1])):
                return True
        return False

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> SignerSettings | None:
        """None when ``--k8s-signer-names`` is empty."""
        names = tuple(v["k8s-signer-names"])
        if not names:
            return None
        for name in names:
            _check_signer_name(name, "k8s-signer-names", pattern=True)
        for name in v["k8s-signer-istiod-signer-names"]:
            _check_signer_name(name, "k8s-signer-istiod-signer-names", pattern=False)
        if not v["k8s-signer-requesters"]:
            raise ConfigError("--k8s-signer-requesters: at least one user (istiod's: system:serviceaccount:NS:istiod)")
        if v["k8s-signer-workers"] < 1:
            raise ConfigError("--k8s-signer-workers: must be >= 1")
        if v["k8s-signer-istiod-max-duration"] < timedelta(minutes=10):
            raise ConfigError("--k8s-signer-istiod-max-duration: must be at least 10m")
        ns = v["istio-namespace"]
        dns = tuple(v["k8s-signer-istiod-dns-names"]) or (
            *(f"istiod.{ns}.svc" if rev == "default" else f"istiod-{rev}.{ns}.svc" for rev in v["istio-revisions"]),
            f"istiod-remote.{ns}.svc",
            f"istio-pilot.{ns}.svc",
        )
        settings = cls(
            names=names,
            requesters=frozenset(v["k8s-signer-requesters"]),
            issuers={},
            istiod_signer_names=frozenset(v["k8s-signer-istiod-signer-names"]),
            istiod_dns_names=frozenset(dns),
            istiod_max_duration=v["k8s-signer-istiod-max-duration"],
            workers=v["k8s-signer-workers"],
        )
        if v["k8s-signer-issuers-file"]:
            issuers = _signer_issuers(v["k8s-signer-issuers-file"], v)
            for name in issuers:
                if not settings.serves(name):
                    raise ConfigError(
                        f"--k8s-signer-issuers-file: [{name!r}] is not one of --k8s-signer-names ({', '.join(names)})"
                    )
            settings = dataclasses.replace(settings, issuers=issuers)
        for name in settings.istiod_signer_names:
            if not settings.serves(name):
                raise ConfigError(f"--k8s-signer-istiod-signer-names: {name!r} is not one of --k8s-signer-names")
        return settings


def _check_signer_name(name: str, flag: str, *, pattern: bool) -> None:
    """A signerName is ``<domain>/<path>``; Kubernetes' own (``kubernetes.io``) are never ours."""
    domain, sep, path = name.partition("/")
    if not sep or not path or not DNS1123.fullmatch(domain):
        raise ConfigError(f"--{flag}: {name!r} is not a signer name (DOMAIN/NAME{' or DOMAIN/*' if pattern else ''})")
    if path == "*" and not pattern:
        raise ConfigError(f"--{flag}: {name!r}: give exact signer names here")
    if "*" in path and path != "*":
        raise ConfigError(f"--{flag}: {name!r}: only DOMAIN/* patterns are supported")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
        raise ConfigError(f"--{flag}: {name!r}: signer names under kubernetes.io belong to Kubernetes' own signers")


def _signer_issuers(path: str, v: Mapping[str, Any]) -> dict[str, SignerIssuer]:
    """Read ``--k8s-signer-issuers-file``: ``["<signerName>"]`` tables in the runtime issuer
    ConfigMap's keys (``issuer`` + the backend's option names), plus ``root-ca-file``."""
    # Imported here: only when the file is given (the registry loads the plugin entry points).
    from csr_service.plugins.registry import ISSUERS, find, plugin_values

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--k8s-signer-issuers-file: cannot read {path}: {exc}") from exc
    default_backend = v["issuer"]
    default_values = plugin_values(find(ISSUERS, default_backend), v)
    issuers: dict[str, SignerIssuer] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f'--k8s-signer-issuers-file: {name!r} must be a table (["{name}"])')
        _check_signer_name(name, "k8s-signer-issuers-file", pattern=False)
        table = dict(table)
        root = table.pop("root-ca-file", "")
        if root and not Path(str(root)).is_file():
            raise ConfigError(f"--k8s-signer-issuers-file: [{name!r}] root-ca-file {root!r} is not a file")
        try:
            backend, values = issuer_values(table, default_backend=default_backend, default_values=default_values)
            find(ISSUERS, backend).validate(values)
        except ConfigError as exc:
            raise ConfigError(f"--k8s-signer-issuers-file: [{name!r}] {exc}") from exc
        issuers[name] = SignerIssuer(backend=backend, values=values, root_ca_file=str(root))
    return issuers


def issuer_values(
    data: Mapping[str, Any], *, default_backend: str, default_values: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(backend, option values) that ``data`` selects: ``issuer`` names the backend (default:
    ``--issuer``'s), every other key is one of its options without the dashes, istio-csr's
    ``issuer-name/kind/group`` are aliases of a backend's ``*-issuer-name/kind/group``. Options not
    given keep the command line's values when the backend is the command line's, and their
    defaults otherwise. Shared by the runtime issuer ConfigMap and the signer's issuers file."""
    from csr_service.plugins.registry import ISSUERS, find, plugins

    data = dict(data)
    backend = str(data.pop("issuer", "")).strip()
    if not backend:
        backend = default_backend
        if any(k in data for k in _ALIASES):
            with_aliases = [n for n in plugins(ISSUERS) if _alias_targets(n)]
            backend = with_aliases[0] if with_aliases else ""
            if not backend:
                raise ConfigError("issuer-name/issuer-kind/issuer-group: no installed issuer plugin has such options")
    if backend not in plugins(ISSUERS):
        raise ConfigError(f"issuer: unknown {backend!r}; choose one of {', '.join(plugins(ISSUERS))}")
    options = {o.name: o for o in find(ISSUERS, backend).options}
    values = {name: opt.default for name, opt in options.items()}
    if backend == default_backend:
        values.update(default_values)
    aliases = _alias_targets(backend)
    for key, raw in data.items():
        name = aliases.get(key, key)
        opt = options.get(name)
        if opt is None:
            raise ConfigError(f"{key}: not an option of issuer {backend!r}")
        try:
            values[name] = opt.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    return backend, values


_ALIASES = ("issuer-name", "issuer-kind", "issuer-group")


def _alias_targets(backend: str) -> dict[str, str]:
    from csr_service.plugins.registry import ISSUERS, find

    names = [o.name for o in find(ISSUERS, backend).options]
    targets: dict[str, str] = {}
    for alias in _ALIASES:
        # The shortest match is the plugin's own issuer reference: cert-manager's
        # ``certmanager-issuer-name``, not ``certmanager-serving-issuer-name``.
        matches = [n for n in names if n.endswith("-" + alias)]
        if matches:
            targets[alias] = min(matches, key=len)
    return targets


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """Everything the controllers and the trust sources need; ``None`` fields mean off."""

    root_configmaps: bool
    root_configmap_name: str
    root_configmap_namespace_selector: str
    root_configmap_workers: int
    leader: LeaderSettings | None
    istiod_cert: bool
    istio_namespace: str
    istio_revisions: tuple[str, ...]
    istiod_cert_duration: timedelta
    istiod_cert_renew_before: timedelta
    istiod_cert_key_type: KeyType
    istiod_additional_dns_names: tuple[str, ...]
    runtime_issuer_configmap: ObjectRef | None
    root_ca_configmap: ObjectRef | None
    root_ca_secret: ObjectRef | None
    trust_roots_from_issuer: bool
    signer: SignerSettings | None = None

    @property
    def needs_kube(self) -> bool:
        """Whether any feature here talks to the apiserver."""
        return bool(
            self.root_configmaps
            or self.leader
            or self.istiod_cert
            or self.runtime_issuer_configmap
            or self.root_ca_configmap
            or self.root_ca_secret
            or self.signer
        )

    @classmethod
    def from_values(cls, v: Mapping[str, Any]) -> ControllerSettings:
        """Validate the option values of ``controllers/options.py``."""
        if v["root-configmaps"] and not DNS1123.fullmatch(v["root-configmap-name"]):
            raise ConfigError(f"--root-configmap-name: not a valid name: {v['root-configmap-name']!r}")
        if v["root-configmap-workers"] < 1:
            raise ConfigError("--root-configmap-workers: must be >= 1")
        leader = _leader(v) if v["leader-election"] else None
        try:
            key_type = KeyType(v["istiod-cert-key-type"])
        except ValueError as exc:
            raise ConfigError(
                f"--istiod-cert-key-type: {v['istiod-cert-key-type']!r}; "
                f"choose one of {', '.join(k.value for k in KeyType)}"
            ) from exc
        if v["istiod-cert"]:
            if v["istiod-cert-duration"] < timedelta(minutes=1):
                raise ConfigError("--istiod-cert-duration: must be at least 1m")
            if not timedelta(0) < v["istiod-cert-renew-before"] < v["istiod-cert-duration"]:
                raise ConfigError("--istiod-cert-renew-before: must be positive and below --istiod-cert-duration")
            if not v["istio-revisions"]:
                raise ConfigError("--istio-revisions: at least one revision (e.g. default)")
        if v["root-ca-configmap"] and v["root-ca-secret"]:
            raise ConfigError("--root-ca-configmap/--root-ca-secret: give one trust source, not both")
        rt = v["runtime-issuer-configmap"]
        cm = v["root-ca-configmap"]
        sec = v["root-ca-secret"]
        return cls(
            root_configmaps=v["root-configmaps"],
            root_configmap_name=v["root-configmap-name"],
            root_configmap_namespace_selector=v["root-configmap-namespace-selector"],
            root_configmap_workers=v["root-configmap-workers"],
            leader=leader,
            istiod_cert=v["istiod-cert"],
            istio_namespace=v["istio-namespace"],
            istio_revisions=tuple(v["istio-revisions"]),
            istiod_cert_duration=v["istiod-cert-duration"],
            istiod_cert_renew_before=v["istiod-cert-renew-before"],
            istiod_cert_key_type=key_type,
            istiod_additional_dns_names=tuple(v["istiod-additional-dns-names"]),
            runtime_issuer_configmap=parse_object_ref(rt, "runtime-issuer-configmap") if rt else None,
            root_ca_configmap=parse_object_ref(cm, "root-ca-configmap", with_key=True, default_key="ca.crt")
            if cm
            else None,
            root_ca_secret=parse_object_ref(sec, "root-ca-secret", with_key=True, default_key="ca.crt")
            if sec
            else None,
            trust_roots_from_issuer=v["trust-roots-from-issuer"],
            signer=SignerSettings.from_values(v),
        )


def _leader(v: Mapping[str, Any]) -> LeaderSettings:
    lease, renew, retry = (
        v["leader-election-lease-duration"],
        v["leader-election-renew-deadline"],
        v["leader-election-retry-period"],
    )
    # client-go's rules: a leader must give up before others may consider the lease expired.
    if not timedelta(0) < retry < renew < lease:
        raise ConfigError(
            "--leader-election-retry-period < --leader-election-renew-deadline < --leader-election-lease-duration "
            f"is required (got {retry}, {renew}, {lease})"
        )
    for flag in ("leader-election-namespace", "leader-election-lease-name"):
        if not DNS1123.fullmatch(v[flag]):
            raise ConfigError(f"--{flag}: not a valid name: {v[flag]!r}")
    identity = v["leader-election-identity"] or (
        f"{os.environ.get('POD_NAME') or socket.gethostname()}_{secrets.token_hex(4)}"
    )
    return LeaderSettings(
        namespace=v["leader-election-namespace"],
        lease_name=v["leader-election-lease-name"],
        identity=identity,
        lease_duration=lease,
        renew_deadline=renew,
        retry_period=retry,
    )
