"""Validated settings of the controllers and trust sources (built by ``Config.from_values``)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.common.errors import ConfigError
from csr_service.kube.refs import DNS1123, ObjectRef, parse_object_ref
from csr_service.pki.keys import KeyType

__all__ = ["ControllerSettings", "LeaderSettings"]


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    namespace: str
    lease_name: str
    identity: str
    lease_duration: timedelta
    renew_deadline: timedelta
    retry_period: timedelta


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
