"""Issuer backends, registered by name and imported lazily.

Each backend lives in its own sub-package with two modules:

- ``options.py``: its settings as :class:`csr_service.options.Option` objects (cheap to
  import: no backend libraries), so ``--help`` and config validation know every flag;
- the implementation, named by ``factory`` below and imported only when that backend is
  selected, so e.g. ``hvac`` is loaded only when Vault is configured.

The contract every backend implements is in :mod:`csr_service.issuers.base`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from csr_service.errors import ConfigError
from csr_service.issuers.base import Issuer
from csr_service.options import Option

if TYPE_CHECKING:
    from csr_service.runtime import Runtime

__all__ = ["BACKENDS", "Backend", "IssuerContext", "backend_options", "create_issuer"]


@dataclass(frozen=True, slots=True)
class IssuerContext:
    """What a backend may need from the rest of the service when it is built."""

    trust_domain: str
    #: Dev mode: backends may create missing material (e.g. the local CA generates a root).
    dev: bool = False
    state_dir: str | None = None
    #: Shared dependencies (e.g. ``runtime.kube()`` for the Kubernetes client); None in unit tests.
    runtime: Runtime | None = None


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    options_module: str
    factory: str  # "module:function"; function(values, context) -> Issuer
    summary: str
    #: Other backends' option lists ("module:ATTRIBUTE") this one also reads, e.g. the local
    #: issuer's Vault-KV CA source reuses the vault-* connection options.
    shared_options: tuple[str, ...] = ()


BACKENDS: dict[str, Backend] = {
    "local": Backend(
        "local",
        "csr_service.issuers.local.options",
        "csr_service.issuers.local.issuer:create",
        "a CA certificate and key from a directory (Istio cacerts or kubernetes.io/tls layout) or Vault KV",
        shared_options=("csr_service.issuers.vault.options:CONNECTION_OPTIONS",),
    ),
    "vault": Backend(
        "vault",
        "csr_service.issuers.vault.options",
        "csr_service.issuers.vault.issuer:create",
        "a Vault / OpenBao PKI role (hvac; install the 'vault' extra)",
    ),
    "cert-manager": Backend(
        "cert-manager",
        "csr_service.issuers.certmanager.options",
        "csr_service.issuers.certmanager.issuer:create",
        "cert-manager CertificateRequests signed by an Issuer, ClusterIssuer or external issuer",
    ),
}


def backend_options(name: str, *, include_shared: bool = False) -> list[Option]:
    """The options a backend declares (imports only its light ``options`` module).

    With ``include_shared``, also those it borrows from other backends (``shared_options``):
    use that for the values handed to its factory, not for listing every flag once.
    """
    backend = BACKENDS[name]
    options: list[Option] = list(importlib.import_module(backend.options_module).OPTIONS)
    if include_shared:
        for ref in backend.shared_options:
            module_name, _, attr = ref.partition(":")
            options.extend(getattr(importlib.import_module(module_name), attr))
    return options


def create_issuer(name: str, values: Mapping[str, Any], context: IssuerContext) -> Issuer:
    """Import backend ``name`` and build it from its option values; ConfigError if unknown."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise ConfigError(f"--issuer: unknown issuer {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    module_name, _, func_name = backend.factory.partition(":")
    factory: Callable[[Mapping[str, Any], IssuerContext], Issuer] = getattr(
        importlib.import_module(module_name), func_name
    )
    return factory(values, context)
