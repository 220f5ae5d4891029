"""Finding and building plugins: issuers and authenticators, one mechanism for both.

A plugin is a :class:`Plugin` object in a module that is cheap to import (no backend
libraries): its name, a one-line summary, every option it reads (each becomes a flag, an
environment variable and a config-file key, see :class:`~csr_service.common.options.Option`),
and its factory as a ``"module:function"`` string, imported only when the plugin is selected
(so ``hvac`` is loaded only when Vault is configured).

Plugins are found through entry points, one group per kind:

- ``csr_service.issuers``: ``name = "package.module:PLUGIN"``, factory
  ``(values, runtime) -> Issuer`` (contract: :mod:`csr_service.plugins.issuer`);
- ``csr_service.authenticators``: the same, factory ``(values, runtime) -> Authenticator``
  (contract: :mod:`csr_service.plugins.authenticator`).

The built-ins are declared in csr-service's own ``pyproject.toml``; a third party ships a
plugin as its own distribution with its own entry point, and it appears in ``--help``,
``--issuer``/``--authenticator`` and the config file like a built-in.

``values`` handed to a factory are the resolved values of exactly the options the plugin
declares (``{option name: typed value}``); ``runtime`` is the narrow set of shared things
(:class:`~csr_service.plugins.runtime.Runtime`). A plugin never sees the whole configuration.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from csr_service.common.errors import ConfigError
from csr_service.common.options import Option

if TYPE_CHECKING:
    from csr_service.plugins.authenticator import Authenticator
    from csr_service.plugins.issuer import Issuer
    from csr_service.plugins.runtime import Runtime

__all__ = [
    "AUTHENTICATORS",
    "ISSUERS",
    "Kind",
    "Plugin",
    "create_authenticator",
    "create_issuer",
    "find",
    "kind_options",
    "plugin_values",
    "plugins",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Plugin:
    """One issuer or authenticator, as declared by its package."""

    name: str
    summary: str
    #: Every option the plugin reads, including ones it shares with other plugins (the same
    #: :class:`Option` objects, e.g. the Vault connection options of two issuers).
    options: Sequence[Option]
    #: ``"module:function"``; ``function(values, runtime)`` builds the plugin's object.
    factory: str
    #: Optional ``"module:function"`` (a cheap module; ``"module:Settings.from_values"`` works
    #: too): ``function(values)`` raises ConfigError for values that can never work, so
    #: ``serve`` fails at start-up, naming the flag.
    validator: str | None = None

    def validate(self, values: Mapping[str, Any]) -> None:
        """Run the plugin's own checks of its values, if it has any."""
        if self.validator is not None:
            _load(self.validator)(values)

    def create(self, values: Mapping[str, Any], runtime: Runtime) -> Any:
        """Import the implementation and build it from the option values."""
        factory: Callable[[Mapping[str, Any], Runtime], Any] = _load(self.factory)
        return factory(values, runtime)


def _load(target: str) -> Any:
    """``"package.module:name"`` or ``"package.module:Class.method"``."""
    module_name, _, path = target.partition(":")
    return functools.reduce(getattr, path.split("."), importlib.import_module(module_name))


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of plugin: its entry-point group and the flag that selects one."""

    what: str
    group: str
    flag: str


ISSUERS = Kind("issuer", "csr_service.issuers", "issuer")
AUTHENTICATORS = Kind("authenticator", "csr_service.authenticators", "authenticator")


@functools.cache
def plugins(kind: Kind) -> Mapping[str, Plugin]:
    """Every installed plugin of ``kind`` by name (entry points read once per process)."""
    found: dict[str, Plugin] = {}
    for ep in entry_points(group=kind.group):
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 (one broken plugin must not hide the others)
            log.error("cannot load %s plugin %s (%s): %s", kind.what, ep.name, ep.value, exc)
            continue
        if not isinstance(plugin, Plugin) or plugin.name != ep.name:
            log.error("%s plugin %s (%s) is not a Plugin named %r; ignored", kind.what, ep.name, ep.value, ep.name)
            continue
        if ep.name in found:
            raise ConfigError(f"--{kind.flag}: two installed {kind.what} plugins are named {ep.name!r}")
        found[ep.name] = plugin
    if not found:
        raise ConfigError(
            f"--{kind.flag}: no {kind.what} plugins installed (entry-point group {kind.group}); "
            "is csr-service installed (pip install -e .)?"
        )
    return dict(sorted(found.items()))


def find(kind: Kind, name: str) -> Plugin:
    """The plugin called ``name``; ConfigError naming the flag if there is none."""
    available = plugins(kind)
    plugin = available.get(name)
    if plugin is None:
        raise ConfigError(f"--{kind.flag}: unknown {kind.what} {name!r}; choose one of {', '.join(available)}")
    return plugin


def kind_options(kind: Kind) -> list[Option]:
    """The options of every plugin of ``kind``, each once, in plugin order."""
    seen: dict[str, Option] = {}
    for plugin in plugins(kind).values():
        for opt in plugin.options:
            other = seen.setdefault(opt.name, opt)
            if other is not opt and other != opt:
                raise ConfigError(f"--{opt.name}: declared differently by two {kind.what} plugins")
    return list(seen.values())


def plugin_values(plugin: Plugin, values: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved values of exactly the options ``plugin`` declares."""
    return {o.name: values.get(o.name, o.default) for o in plugin.options}


def create_issuer(name: str, values: Mapping[str, Any], runtime: Runtime) -> Issuer:
    """Build issuer ``name`` from its option values (``--issuer``)."""
    issuer: Issuer = find(ISSUERS, name).create(values, runtime)
    return issuer


def create_authenticator(name: str, values: Mapping[str, Any], runtime: Runtime) -> Authenticator:
    """Build authenticator ``name`` from its option values (``--authenticator``)."""
    authenticator: Authenticator = find(AUTHENTICATORS, name).create(values, runtime)
    return authenticator
