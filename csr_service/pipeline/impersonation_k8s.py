"""Node impersonation for ztunnel, as istiod's NodeAuthorizer allows it.

ztunnel runs one per node and asks for the certificates of the workloads on its node, sending
``ImpersonatedIdentity: spiffe://<td>/ns/<ns>/sa/<sa>`` in the request metadata. We allow it
only when all of these hold, checked in this order:

1. the caller's ``ns/sa`` is in ``--ca-trusted-node-accounts`` (Istio's
   ``CA_TRUSTED_NODE_ACCOUNTS``, e.g. ``istio-system/ztunnel``);
2. the requested identity is a SPIFFE id of Istio's form in our trust domain;
3. the caller's token is bound to a pod (TokenReview extras or the JWT's ``kubernetes.io``
   claim carry its name and uid), that pod exists with that uid and runs as the caller's
   service account;
4. an active (Pending or Running) pod of the requested service account is on the caller's node.

Answered from the watched :class:`~csr_service.kube.podcache.PodCache`. The cache may lag the
apiserver by a moment: a pod scheduled a split second ago can be refused once and succeed on the
client's retry (istiod has the same window).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from csr_service.common.errors import InvalidRequestError, PermissionDeniedError, UnavailableError
from csr_service.common.identity import parse_spiffe_id
from csr_service.kube.podcache import PodInfo
from csr_service.plugins.authenticator import Caller

if TYPE_CHECKING:
    from csr_service.kube.cluster_pods import ClusterPodCaches
    from csr_service.kube.podcache import PodCache
    from csr_service.plugins.runtime import Runtime

__all__ = ["NodeImpersonationPolicy", "PodLookup", "node_impersonation"]

log = logging.getLogger(__name__)


class PodLookup(Protocol):
    """What the policy needs from the pod cache."""

    def is_synced(self) -> bool: ...

    def pod_by_uid(self, uid: str) -> PodInfo | None: ...

    def pod(self, namespace: str, name: str) -> PodInfo | None: ...

    def has_pod_on_node(self, node: str, namespace: str, service_account: str) -> bool: ...


def _refuse(public: str, detail: str) -> PermissionDeniedError:
    return PermissionDeniedError(f"impersonation refused: {public}", detail=f"impersonation refused: {detail}")


class NodeImpersonationPolicy:
    """An :class:`~csr_service.pipeline.impersonation.ImpersonationPolicy` (see the module docstring).

    ``pods`` is one cluster's pod lookup, or (multi-cluster) a function from the caller's
    cluster id to that cluster's: a ztunnel's node and the pods on it are in its own cluster.
    """

    def __init__(
        self,
        pods: PodLookup | Callable[[str | None], PodLookup | None],
        *,
        trusted_accounts: Iterable[tuple[str, str]],
        trust_domain: str,
    ) -> None:
        self._lookup: Callable[[str | None], PodLookup | None] = pods if callable(pods) else (lambda _cid: pods)
        self._trusted = frozenset(trusted_accounts)
        self._trust_domain = trust_domain

    async def authorize(self, caller: Caller, requested: str) -> str:
        """Return the requested identity's URI, or raise (see the module docstring)."""
        ns, sa = caller.identity.namespace, caller.identity.service_account
        who = f"{ns}/{sa}"
        if (ns, sa) not in self._trusted:
            raise _refuse(
                "the caller is not a trusted node agent",
                f"{who} asked for {requested[:200]!r} but is not in --ca-trusted-node-accounts",
            )
        try:
            target = parse_spiffe_id(requested)
        except ValueError as exc:
            raise InvalidRequestError(
                "ImpersonatedIdentity is not a valid Istio SPIFFE identity", detail=str(exc)
            ) from exc
        if target.trust_domain != self._trust_domain:
            raise _refuse(
                "the identity is outside this CA's trust domain",
                f"{who} asked for {target} but the trust domain is {self._trust_domain}",
            )
        if not caller.pod_uid:
            raise _refuse(
                "the caller's token is not bound to a pod",
                f"{who} asked for {target} with a token that names no pod (pod uid needed)",
            )
        pods = self._lookup(caller.cluster_id)
        if pods is None or not pods.is_synced():
            raise UnavailableError(
                "pod information not loaded yet; retry",
                detail=f"pod cache of cluster {caller.cluster_id or '<local>'} not synced yet",
            )
        pod = self._caller_pod(pods, caller, who, str(target))
        if not pods.has_pod_on_node(pod.node, target.namespace, target.service_account):
            raise _refuse(
                "no pod of the requested identity runs on the caller's node",
                f"{who} (pod {pod.name}) asked for {target}: no active pod of "
                f"{target.namespace}/{target.service_account} on node {pod.node!r}",
            )
        log.info(
            "impersonation allowed caller=%s cluster=%s pod=%s node=%s identity=%s",
            who,
            caller.cluster_id or "<local>",
            pod.name,
            pod.node,
            target,
        )
        return target.uri

    def _caller_pod(self, pods: PodLookup, caller: Caller, who: str, target: str) -> PodInfo:
        assert caller.pod_uid is not None
        ns, sa = caller.identity.namespace, caller.identity.service_account
        pod = pods.pod_by_uid(caller.pod_uid)
        if pod is None:
            same_name = pods.pod(ns, caller.pod_name) if caller.pod_name else None
            if same_name is not None:
                raise _refuse(
                    "the caller's pod was replaced",
                    f"{who} asked for {target}: pod {ns}/{caller.pod_name} has uid {same_name.uid}, "
                    f"the token names {caller.pod_uid}",
                )
            raise _refuse(
                "the caller's pod does not exist",
                f"{who} asked for {target}: no active pod with uid {caller.pod_uid} ({ns}/{caller.pod_name})",
            )
        if pod.namespace != ns or (caller.pod_name and pod.name != caller.pod_name):
            raise _refuse(
                "the caller's pod does not match its token",
                f"{who} asked for {target}: pod uid {pod.uid} is {pod.namespace}/{pod.name}, "
                f"the token names {ns}/{caller.pod_name}",
            )
        if pod.service_account != sa:
            raise _refuse(
                "the caller's pod runs as another service account",
                f"{who} asked for {target}: pod {ns}/{pod.name} runs as {pod.service_account}",
            )
        if not pod.node:
            raise _refuse("the caller's pod is not on a node", f"{who}: pod {ns}/{pod.name} has no nodeName yet")
        return pod


def node_impersonation(
    accounts: Sequence[tuple[str, str]], runtime: Runtime
) -> tuple[NodeImpersonationPolicy, PodCache | ClusterPodCaches] | None:
    """The policy and its pod cache(s) when ``--ca-trusted-node-accounts`` is set, else None."""
    if not accounts:
        return None
    if runtime.clusters is not None:  # one pod cache per cluster
        from csr_service.kube.cluster_pods import ClusterPodCaches

        caches = ClusterPodCaches(runtime.clusters)
        multi = NodeImpersonationPolicy(
            caches.for_cluster, trusted_accounts=accounts, trust_domain=runtime.trust_domain
        )
        return multi, caches
    from csr_service.kube.podcache import PodCache

    pods = PodCache(runtime.kube())
    policy = NodeImpersonationPolicy(pods, trusted_accounts=accounts, trust_domain=runtime.trust_domain)
    return policy, pods
