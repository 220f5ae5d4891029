"""What plugins and controllers share in one worker process: a few core settings and the
Kubernetes client, created lazily.

Deliberately narrow: a plugin reads its own options (handed to its factory) and these, never
the whole configuration. Nothing here connects anywhere until asked: a dev-mode run never
creates a Kubernetes client.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from csr_service.common.errors import ConfigError

if TYPE_CHECKING:
    from csr_service.kube.client import KubeSettings

__all__ = ["Runtime"]


class Runtime:
    """Per-process shared things: trust domain, dev mode, worker index, the Kubernetes client."""

    def __init__(
        self,
        *,
        trust_domain: str = "cluster.local",
        dev: bool = False,
        state_dir: str | None = None,
        worker_index: int = 0,
        kube_settings: KubeSettings | None = None,
        kube_client: Any = None,
    ) -> None:
        #: The mesh's SPIFFE trust domain (``--trust-domain``).
        self.trust_domain = trust_domain
        #: Dev mode: plugins may create missing material (e.g. the local CA generates a root).
        self.dev = dev
        #: Where dev mode keeps its state.
        self.state_dir = state_dir
        #: 0 for the worker that also runs the once-per-replica work (controllers, sweepers).
        self.worker_index = worker_index
        self._kube_settings = kube_settings
        self._kube = kube_client

    @property
    def kube_request_timeout(self) -> timedelta:
        """Timeout of one non-watch API request (``--kube-request-timeout``)."""
        return self._kube_settings.request_timeout if self._kube_settings else timedelta(seconds=10)

    def kube(self) -> Any:
        """The shared ``kubernetes.client.ApiClient`` (created on first use)."""
        if self._kube is None:
            if self._kube_settings is None:
                raise ConfigError("--kubeconfig: Kubernetes settings missing")
            from csr_service.kube.client import new_api_client

            self._kube = new_api_client(self._kube_settings)
        return self._kube
