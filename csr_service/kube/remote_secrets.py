"""Remote clusters from istiod-format remote Secrets, watched (``--multicluster-secrets``).

The format is istiod's, so an operator reuses ``istioctl create-remote-secret`` output: a
Secret in csr-service's namespace labelled ``istio/multiCluster=true`` whose every data key is
a cluster id and whose value is a kubeconfig for that cluster's apiserver. Adding, changing or
removing such a Secret (or a key in it) adds, replaces or removes the cluster at run time.

A kubeconfig from a Secret must carry its credentials inline: a token or client certificate
data, and the apiserver's CA as data. Exec plugins, auth providers, and file paths (token
files, certificate or key files) are refused, as istiod refuses them by default: whoever can
write a Secret in our namespace must not be able to make csr-service run a program or read
its own files. ``insecure-skip-tls-verify`` is refused too (a token sent to an unverified
server is a token given away).

One cluster id in two Secrets: the first one seen keeps it, the other is logged and ignored
until the first is removed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from csr_service.kube.client import KubeSettings, api_client_from_kubeconfig
from csr_service.kube.clusters import Cluster, ClusterSet, MulticlusterSettings
from csr_service.kube.util import LoopInformer, Watch, WatchFactory

__all__ = ["RemoteSecretWatcher", "clusters_from_secret_data", "own_namespace", "sanitize_kubeconfig"]

log = logging.getLogger(__name__)

_SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_FORBIDDEN_USER_FIELDS = (
    "exec",
    "auth-provider",
    "tokenFile",
    "client-certificate",
    "client-key",
    "username",
    "password",
)
_FORBIDDEN_CLUSTER_FIELDS = ("certificate-authority", "insecure-skip-tls-verify", "proxy-url")


def own_namespace(configured: str) -> str:
    """``--multicluster-namespace``, else ``$POD_NAMESPACE``, else the service-account mount's."""
    if configured:
        return configured
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        return _SA_NAMESPACE_FILE.read_text().strip()
    return ""


def sanitize_kubeconfig(doc: Any) -> dict[str, Any]:
    """The kubeconfig ``doc`` if it only carries inline credentials; ValueError saying what is refused."""
    if not isinstance(doc, dict):
        raise ValueError("not a kubeconfig (a YAML mapping)")
    for entry in doc.get("users") or ():
        user = (entry or {}).get("user") or {}
        bad = [f for f in _FORBIDDEN_USER_FIELDS if user.get(f)]
        if bad:
            raise ValueError(f"user {entry.get('name')!r} uses {', '.join(bad)}, which a remote secret may not")
    for entry in doc.get("clusters") or ():
        cluster = (entry or {}).get("cluster") or {}
        bad = [f for f in _FORBIDDEN_CLUSTER_FIELDS if cluster.get(f)]
        if bad:
            raise ValueError(f"cluster {entry.get('name')!r} uses {', '.join(bad)}, which a remote secret may not")
        if not cluster.get("certificate-authority-data"):
            raise ValueError(f"cluster {entry.get('name')!r} has no certificate-authority-data")
    return doc


def clusters_from_secret_data(data: dict[str, str] | None, source: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{cluster id: (digest, kubeconfig)}`` of a Secret's (base64) data; bad entries are logged and skipped."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for cluster_id, encoded in (data or {}).items():
        try:
            raw = base64.b64decode(encoded, validate=True)
            doc = sanitize_kubeconfig(yaml.safe_load(raw))
        except (binascii.Error, ValueError, yaml.YAMLError) as exc:
            log.error("multicluster: %s key %r: refused: %s", source, cluster_id, exc)
            continue
        found[cluster_id] = (hashlib.sha256(raw).hexdigest(), doc)
    return found


class RemoteSecretWatcher:
    """Keeps the remote clusters of a :class:`ClusterSet` in step with the labelled Secrets.

    Runs in every worker (each worker reviews tokens with its own clients). ``watch`` is the
    seam for tests, as in the controllers.
    """

    name = "remote-cluster-secrets"
    all_workers = True

    def __init__(
        self,
        api: Any,
        clusters: ClusterSet,
        settings: MulticlusterSettings,
        kube_settings: KubeSettings,
        *,
        watch: WatchFactory = LoopInformer,
        sync_timeout: float = 30.0,
    ) -> None:
        self._api = api
        self._clusters = clusters
        self._settings = settings
        self._kube_settings = kube_settings
        self._watch_factory = watch
        self._sync_timeout = sync_timeout
        self._watch: Watch | None = None
        self._namespace = ""
        #: Secret name -> the cluster ids it holds (and that we took from it).
        self._by_secret: dict[str, set[str]] = {}

    async def start(self) -> None:
        from kubernetes import client

        self._namespace = own_namespace(self._settings.namespace)
        if not self._namespace:
            from csr_service.common.errors import ConfigError

            raise ConfigError(
                "--multicluster-namespace: not set and not running in a pod; name csr-service's namespace"
            )
        core = client.CoreV1Api(self._api)
        self._watch = self._watch_factory(
            functools.partial(core.list_namespaced_secret, self._namespace),
            self._on_event,
            name="remote-secrets",
            list_kwargs={"label_selector": self._settings.label_selector},
        )
        if not await self._watch.start(sync_timeout=self._sync_timeout):
            log.warning(
                "multicluster: Secrets in %s not listed yet; remote clusters come when they are", self._namespace
            )
        else:
            log.info(
                "multicluster: watching Secrets %s in %s: %d remote cluster(s)",
                self._settings.label_selector,
                self._namespace,
                len(self._clusters.remotes()),
            )

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
            self._watch = None
        for name in list(self._by_secret):
            self._forget(name)

    def _on_event(self, kind: str, secret: Any) -> None:
        meta = secret.metadata
        name = str(meta.name)
        if kind == "DELETED":
            self._forget(name)
            return
        source = f"secret {self._namespace}/{name}"
        wanted = clusters_from_secret_data(secret.data, source)
        held = self._by_secret.setdefault(name, set())
        for cluster_id in sorted(held - set(wanted)):
            self._clusters.remove_remote(cluster_id, source=source)
            held.discard(cluster_id)
        for cluster_id, (digest, doc) in sorted(wanted.items()):
            current = self._clusters.get(cluster_id)
            if current is not None and current.source != source:
                log.error(
                    "multicluster: %s names cluster %r, which %s already provides; ignored",
                    source,
                    cluster_id,
                    current.source,
                )
                continue
            if current is not None and current.digest == digest:
                continue
            try:
                api = api_client_from_kubeconfig(doc, self._kube_settings)
            except ValueError as exc:
                log.error("multicluster: %s key %r: %s", source, cluster_id, exc)
                continue
            client: Callable[[], Any] = functools.partial(_same, api)
            if self._clusters.put_remote(Cluster(cluster_id, client, source=source, digest=digest)):
                held.add(cluster_id)

    def _forget(self, name: str) -> None:
        source = f"secret {self._namespace}/{name}"
        for cluster_id in sorted(self._by_secret.pop(name, set())):
            self._clusters.remove_remote(cluster_id, source=source)


def _same(api: Any) -> Any:
    return api
