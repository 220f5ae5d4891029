"""Validated, frozen settings of the cert-manager issuer, built from its option values.

Free of the ``kubernetes`` client so configuration errors name the flag before any backend
library is imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.common.errors import ConfigError

__all__ = ["Settings", "parse_annotations"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9]{0,62}")
# Kubernetes qualified name: optional DNS-subdomain prefix, then a name of <= 63 characters.
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
#: A sweeper must never delete a request that is still being waited for.
_MIN_SWEEP_AGE = timedelta(minutes=1)


def parse_annotations(items: tuple[str, ...], flag: str) -> dict[str, str]:
    """``("k=v", ...)`` → ``{"k": "v"}``; ConfigError naming ``flag`` on a malformed entry."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        prefix, slash, name = key.rpartition("/")
        valid = bool(sep) and _QUALIFIED_NAME.fullmatch(name) is not None
        if slash:
            valid = valid and len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix) is not None
        if not valid:
            raise ConfigError(f"--{flag}: {item!r} is not KEY=VALUE with a valid annotation key")
        out[key] = value.strip()
    return out


@dataclass(frozen=True, slots=True)
class Settings:
    """Where requests go, which issuer signs them, and how long we wait and keep them."""

    namespace: str
    issuer_name: str
    issuer_kind: str
    issuer_group: str
    preserve: bool
    annotations: Mapping[str, str]
    timeout: timedelta
    sweep_age: timedelta
    sweep_interval: timedelta
    trust_status_ca: bool
    #: (name, kind, group) of the issuer for csr-service's own certificates; None: the workload issuer.
    serving_issuer: tuple[str, str, str] | None = None

    def _ref(self, purpose: str) -> tuple[str, str, str]:
        if purpose != "workload" and self.serving_issuer is not None:
            return self.serving_issuer
        return self.issuer_name, self.issuer_kind, self.issuer_group

    @property
    def issuer_ref(self) -> dict[str, str]:
        """``spec.issuerRef`` of every workload request."""
        return self.issuer_ref_for("workload")

    def issuer_ref_for(self, purpose: str) -> dict[str, str]:
        """``spec.issuerRef`` for a request of ``purpose`` (serving/istiod may have their own issuer)."""
        name, kind, group = self._ref(purpose)
        return {"name": name, "kind": kind, "group": group}

    def describe_issuer(self, purpose: str = "workload") -> str:
        """``Issuer istio-system/istio-ca`` or ``ClusterIssuer istio-ca`` (group if not cert-manager's)."""
        name, kind, group_name = self._ref(purpose)
        where = f"{self.namespace}/{name}" if kind == "Issuer" else name
        group = "" if group_name == "cert-manager.io" else f".{group_name}"
        return f"{kind}{group} {where}"

    @property
    def sweeping(self) -> bool:
        """Whether the leftover sweeper runs."""
        return not self.preserve and self.sweep_age > timedelta(0)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Settings:
        """Validate the ``certmanager-*`` options; ConfigError names the flag."""
        namespace = str(values.get("certmanager-namespace") or "")
        if not _DNS_LABEL.fullmatch(namespace):
            raise ConfigError(f"--certmanager-namespace: {namespace!r} is not a valid namespace name")
        name = str(values.get("certmanager-issuer-name") or "")
        if not name or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            raise ConfigError(f"--certmanager-issuer-name: {name!r} is not a valid object name")
        kind = str(values.get("certmanager-issuer-kind") or "")
        if not _KIND.fullmatch(kind):
            raise ConfigError(f"--certmanager-issuer-kind: {kind!r} is not a kind (e.g. Issuer, ClusterIssuer)")
        group = str(values.get("certmanager-issuer-group") or "")
        if not group or not _DNS_SUBDOMAIN.fullmatch(group):
            raise ConfigError(f"--certmanager-issuer-group: {group!r} is not an API group (e.g. cert-manager.io)")
        serving: tuple[str, str, str] | None = None
        serving_name = str(values.get("certmanager-serving-issuer-name") or "")
        if serving_name:
            if len(serving_name) > 253 or not _DNS_SUBDOMAIN.fullmatch(serving_name):
                raise ConfigError(f"--certmanager-serving-issuer-name: {serving_name!r} is not a valid object name")
            serving_kind = str(values.get("certmanager-serving-issuer-kind") or "") or kind
            if not _KIND.fullmatch(serving_kind):
                raise ConfigError(f"--certmanager-serving-issuer-kind: {serving_kind!r} is not a kind")
            serving_group = str(values.get("certmanager-serving-issuer-group") or "") or group
            if not _DNS_SUBDOMAIN.fullmatch(serving_group):
                raise ConfigError(f"--certmanager-serving-issuer-group: {serving_group!r} is not an API group")
            serving = (serving_name, serving_kind, serving_group)
        elif values.get("certmanager-serving-issuer-kind") or values.get("certmanager-serving-issuer-group"):
            raise ConfigError("--certmanager-serving-issuer-kind/-group: only with --certmanager-serving-issuer-name")
        timeout: timedelta = values.get("certmanager-timeout", timedelta(seconds=8))
        if timeout <= timedelta(0):
            raise ConfigError("--certmanager-timeout: must be positive")
        sweep_age: timedelta = values.get("certmanager-sweep-age", timedelta(minutes=15))
        sweep_interval: timedelta = values.get("certmanager-sweep-interval", timedelta(minutes=5))
        if sweep_age < timedelta(0):
            raise ConfigError("--certmanager-sweep-age: must be >= 0 (0 disables the sweeper)")
        if sweep_age > timedelta(0):
            floor = max(_MIN_SWEEP_AGE, 2 * timeout)
            if sweep_age < floor:
                raise ConfigError(
                    f"--certmanager-sweep-age: must be at least {int(floor.total_seconds())}s "
                    "(1m and twice --certmanager-timeout), or the sweeper could delete requests still in use"
                )
            if sweep_interval <= timedelta(0):
                raise ConfigError("--certmanager-sweep-interval: must be positive")
        return cls(
            namespace=namespace,
            issuer_name=name,
            issuer_kind=kind,
            issuer_group=group,
            preserve=bool(values.get("preserve-certificate-requests", False)),
            annotations=parse_annotations(
                tuple(values.get("certmanager-additional-annotations", ()) or ()), "certmanager-additional-annotations"
            ),
            timeout=timeout,
            sweep_age=sweep_age,
            sweep_interval=sweep_interval,
            trust_status_ca=bool(values.get("certmanager-trust-status-ca", False)),
            serving_issuer=serving,
        )
