"""SPIFFE identities as Istio uses them: ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SpiffeId", "parse_spiffe_id", "service_account_from_username"]

# Kubernetes names: namespaces and service accounts are DNS labels / subdomains.
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SA_USERNAME_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity in Istio's SPIFFE form."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse ``spiffe://td/ns/NS/sa/SA``; raise ValueError with the reason otherwise."""
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise ValueError(f"not a SPIFFE URI: {uri[:100]!r}")
    rest = uri[len(prefix) :]
    parts = rest.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise ValueError(f"not of the form spiffe://<trust-domain>/ns/<ns>/sa/<sa>: {uri[:200]!r}")
    td, _, ns, _, sa = parts
    if not _TRUST_DOMAIN.fullmatch(td):
        raise ValueError(f"invalid trust domain in {uri[:200]!r}")
    if not _K8S_NAME.fullmatch(ns) or not _K8S_NAME.fullmatch(sa):
        raise ValueError(f"invalid namespace or service account in {uri[:200]!r}")
    return SpiffeId(td, ns, sa)


def service_account_from_username(username: str) -> tuple[str, str]:
    """Split ``system:serviceaccount:<ns>:<sa>`` into (ns, sa); ValueError otherwise."""
    if not username.startswith(_SA_USERNAME_PREFIX):
        raise ValueError("subject is not a Kubernetes service account")
    parts = username[len(_SA_USERNAME_PREFIX) :].split(":")
    if len(parts) != 2 or not _K8S_NAME.fullmatch(parts[0]) or not _K8S_NAME.fullmatch(parts[1]):
        raise ValueError("malformed service-account subject")
    return parts[0], parts[1]
