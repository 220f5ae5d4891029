"""Shared, lazily created dependencies handed to authenticators, issuers and controllers.

Built once per worker process from the Config. Nothing here connects anywhere until asked:
a dev-mode run never creates a Kubernetes client.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from csr_service.config import Config
from csr_service.errors import ConfigError

__all__ = ["Component", "Runtime"]


@runtime_checkable
class Component(Protocol):
    """A background part of the service (watch, controller, leader elector, HTTP server).

    ``all_workers``: True for what every worker process needs (e.g. a JWKS refresher or a pod
    cache used by the request pipeline); False for cluster-wide work that must run once per
    replica (controllers, leader election), which runs in worker 0 only.
    """

    name: str
    all_workers: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Runtime:
    """Per-process dependencies: the config, the worker index, the Kubernetes client."""

    def __init__(self, config: Config, *, worker_index: int = 0) -> None:
        self.config = config
        self.worker_index = worker_index
        self._kube: Any = None

    def kube(self) -> Any:
        """The shared ``kubernetes.client.ApiClient`` (created on first use)."""
        if self._kube is None:
            if self.config.kube is None:
                raise ConfigError("--kubeconfig: Kubernetes settings missing")
            from csr_service.kube.client import new_api_client

            self._kube = new_api_client(self.config.kube)
        return self._kube
