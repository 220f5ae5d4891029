"""Build the Kubernetes-facing components from the configuration (called by ``app.build_service``).

Only what is switched on is created, so a run without Kubernetes features (dev mode, or a
plain ``--root-ca-file`` setup) creates no Kubernetes client at all.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from csr_service.common.lifecycle import Component
    from csr_service.config import Config
    from csr_service.pipeline.handler import IssuerSlot
    from csr_service.plugins.runtime import Runtime
    from csr_service.transport.serving_cert import ServingCertificate
    from csr_service.trust.bundle import TrustBundle

__all__ = ["build_components", "trust_from_source"]


def trust_from_source(config: Config) -> bool:
    """Whether the trust bundle comes from a configured source rather than from the issuer."""
    c = config.controllers
    return bool(config.pipeline.root_ca_file or (c and (c.root_ca_configmap or c.root_ca_secret)))


def build_components(
    config: Config, runtime: Runtime, slot: IssuerSlot, trust: TrustBundle, serving: ServingCertificate | None
) -> list[Component]:
    """Trust sources, runtime issuer, and the leader-only controllers (behind the elector if on):
    root ConfigMaps, istiod-tls, the Kubernetes CSR signer."""
    c = config.controllers
    components: list[Component] = []
    if config.pipeline.root_ca_file:
        from csr_service.trust.sources import FileTrustSource

        components.append(FileTrustSource(config.pipeline.root_ca_file, trust))
    if c is None:
        return components
    if c.root_ca_configmap or c.root_ca_secret:
        from csr_service.trust.sources import KubeTrustSource

        ref = c.root_ca_secret or c.root_ca_configmap
        assert ref is not None
        components.append(KubeTrustSource(runtime, trust, ref, secret=c.root_ca_secret is not None))
    if c.runtime_issuer_configmap:
        from csr_service.controllers.runtime_issuer import RuntimeIssuerController

        components.append(
            RuntimeIssuerController(
                runtime,
                slot,
                trust,
                ref=c.runtime_issuer_configmap,
                default_backend=config.issuer.name,
                default_values=config.issuer.values,
                probe_dns_names=config.server.serving_dns_names,
                grace=config.server.request_timeout + timedelta(seconds=1),
                on_change=serving.request_renewal if serving is not None else None,
            )
        )
    leader_only: list[Component] = []
    if c.root_configmaps:
        from csr_service.controllers.root_configmaps import RootConfigMapController

        def root_configmaps(api: Any, bundle: TrustBundle, cluster: str = "") -> RootConfigMapController:
            return RootConfigMapController(
                api,
                bundle,
                configmap_name=c.root_configmap_name,
                namespace_selector=c.root_configmap_namespace_selector,
                workers=c.root_configmap_workers,
                cluster=cluster,
            )

        leader_only.append(root_configmaps(runtime.kube(), trust))
        if runtime.clusters is not None:  # --multicluster-secrets: the same in every remote cluster
            from csr_service.controllers.remote_root_configmaps import RemoteRootConfigMaps

            leader_only.append(RemoteRootConfigMaps(runtime.clusters, trust, controller=root_configmaps))
    if c.istiod_cert:
        from csr_service.controllers.istiod_cert import IstiodCertController, IstiodCertSpec

        spec = IstiodCertSpec(
            namespace=c.istio_namespace,
            revisions=c.istio_revisions,
            trust_domain=config.pipeline.trust_domain,
            duration=c.istiod_cert_duration,
            renew_before=c.istiod_cert_renew_before,
            key_type=c.istiod_cert_key_type,
            additional_dns_names=c.istiod_additional_dns_names,
        )
        leader_only.append(IstiodCertController(runtime.kube(), slot, trust, spec))
    if c.signer is not None:
        from csr_service.controllers.csr_signer import CSRSignerController, SignerContext

        leader_only.append(
            CSRSignerController(
                runtime,
                c.signer,
                SignerContext(
                    trust_domain=config.pipeline.trust_domain,
                    max_duration=config.pipeline.max_certificate_duration,
                    default_duration=config.pipeline.default_certificate_duration,
                ),
                slot=slot,
                trust=trust,
            )
        )
    if c.leader is not None:
        from csr_service.controllers.leader import LeaderElector

        components.append(LeaderElector.from_runtime(runtime, c.leader, leader_only))
    else:
        components.extend(leader_only)
    return components
