"""What plugins and controllers share in one worker process: a few core settings and the
Kubernetes client, created lazily.

Deliberately narrow: a plugin reads its own options (handed to its factory) and these, never
the whole configuration. Nothing here connects anywhere until asked: a dev-mode run never
creates a Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from csr_service.common.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

    from csr_service.kube.client import KubeSettings
    from csr_service.kube.clusters import ClusterSet

__all__ = ["Runtime"]


@dataclass(kw_only=True)
class Runtime:
    """Per-process shared things: trust domain, dev mode, worker index, the Kubernetes client."""

    #: The mesh's SPIFFE trust domain (``--trust-domain``).
    trust_domain: str = "cluster.local"
    #: Dev mode: plugins may create missing material (e.g. the local CA generates a root).
    dev: bool = False
    #: Where dev mode keeps its state.
    state_dir: str | None = None
    #: 0 for the worker that also runs the once-per-replica work (controllers, sweepers).
    worker_index: int = 0
    kube_settings: KubeSettings | None = field(default=None, repr=False)
    #: A ready ``ApiClient`` (tests); otherwise one is made from ``kube_settings`` on first use.
    kube_client: Any = field(default=None, repr=False)
    #: The roots of the current trust bundle (follows rotations); set by the wiring before any
    #: plugin is built. For plugins that verify certificates (the ``client-cert`` authenticator).
    trust_roots: Callable[[], tuple[x509.Certificate, ...]] | None = field(default=None, repr=False)
    #: The clusters whose workloads this CA serves (``--cluster-id`` and the remote clusters of
    #: ``--multicluster-secrets``); set by the wiring when a Kubernetes feature needs it.
    clusters: ClusterSet | None = field(default=None, repr=False)

    @property
    def kube_request_timeout(self) -> timedelta:
        """Timeout of one non-watch API request (``--kube-request-timeout``)."""
        return self.kube_settings.request_timeout if self.kube_settings else timedelta(seconds=10)

    def kube(self) -> Any:
        """The shared ``kubernetes.client.ApiClient`` (created on first use)."""
        if self.kube_client is None:
            if self.kube_settings is None:
                raise ConfigError("--kubeconfig: Kubernetes settings missing")
            from csr_service.kube.client import new_api_client

            self.kube_client = new_api_client(self.kube_settings)
        return self.kube_client
