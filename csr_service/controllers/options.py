"""Options of the Kubernetes controllers and of the trust-bundle sources (cheap to import).

Names follow istio-csr's Helm values where the meaning is the same (see ANCHOR.md):
``app.controller.configmapNamespaceSelector`` → ``--root-configmap-namespace-selector``,
``app.controller.leaderElectionNamespace`` → ``--leader-election-namespace``,
``app.tls.istiodCertificate*`` → ``--istiod-cert*``, ``app.istio.{namespace,revisions}`` →
``--istio-namespace``/``--istio-revisions``, ``app.runtimeConfiguration.name`` →
``--runtime-issuer-configmap``, ``app.tls.rootCAFile`` → ``--root-ca-file`` (core option).
"""

from __future__ import annotations

from datetime import timedelta

from csr_service.common.options import Option

__all__ = ["CONTROLLER_OPTIONS", "SIGNER_OPTIONS", "TRUST_SOURCE_OPTIONS"]

#: Where the trust bundle comes from, next to the core ``--root-ca-file``.
TRUST_SOURCE_OPTIONS = [
    Option(
        "root-ca-configmap",
        "Trust bundle from a ConfigMap, NS/NAME[:KEY] (key default ca.crt); watched, changes apply without restart.",
        "",
        group="pipeline",
        metavar="NS/NAME[:KEY]",
    ),
    Option(
        "root-ca-secret",
        "Trust bundle from a Secret, NS/NAME[:KEY] (key default ca.crt); watched, changes apply without restart.",
        "",
        group="pipeline",
        metavar="NS/NAME[:KEY]",
    ),
    Option(
        "trust-roots-from-issuer",
        "Trust whatever roots the issuer reports (trust on first use; logged as a warning). Needed for "
        "non-local issuers without --root-ca-file/--root-ca-configmap/--root-ca-secret.",
        False,
        group="pipeline",
        kind="bool",
    ),
]

CONTROLLER_OPTIONS = [
    # --- root CA ConfigMaps
    Option(
        "root-configmaps",
        "Publish the trust bundle as a ConfigMap (key root-cert.pem) in every matching namespace (leader only).",
        False,
        group="controllers",
        kind="bool",
    ),
    Option("root-configmap-name", "Name of the root CA ConfigMaps.", "istio-ca-root-cert", group="controllers"),
    Option(
        "root-configmap-namespace-selector",
        "Label selector of the namespaces that get the root ConfigMap; empty: all namespaces.",
        "",
        group="controllers",
        metavar="SELECTOR",
    ),
    Option(
        "root-configmap-workers",
        "Parallel ConfigMap writers (istio-csr: maxConcurrentReconciles, 1).",
        16,
        group="controllers",
        kind="int",
    ),
    # --- leader election
    Option(
        "leader-election",
        "Elect one leader among replicas with a coordination.k8s.io Lease; leader-only work (root "
        "ConfigMaps, istiod certificate) runs on the leader. Signing runs on every replica regardless.",
        False,
        group="controllers",
        kind="bool",
    ),
    Option("leader-election-namespace", "Namespace of the Lease.", "istio-system", group="controllers"),
    Option("leader-election-lease-name", "Name of the Lease.", "csr-service", group="controllers"),
    Option(
        "leader-election-identity",
        "This replica's identity in the Lease; empty: $POD_NAME or the hostname, plus a random suffix.",
        "",
        group="controllers",
    ),
    Option(
        "leader-election-lease-duration",
        "How long a Lease is valid without renewal; another replica takes over after it.",
        timedelta(seconds=15),
        group="controllers",
        kind="duration",
    ),
    Option(
        "leader-election-renew-deadline",
        "The leader steps down (stops leader-only work) if it could not renew for this long.",
        timedelta(seconds=10),
        group="controllers",
        kind="duration",
    ),
    Option(
        "leader-election-retry-period",
        "Interval between acquire/renew attempts.",
        timedelta(seconds=2),
        group="controllers",
        kind="duration",
    ),
    # --- istiod certificate
    Option(
        "istiod-cert",
        "Keep Secret istiod-tls (tls.crt, tls.key, ca.crt) in --istio-namespace for istiod with "
        "ENABLE_CA_SERVER=false (leader only).",
        False,
        group="controllers",
        kind="bool",
    ),
    Option("istio-namespace", "Namespace where istiod runs.", "istio-system", group="controllers"),
    Option(
        "istio-revisions",
        "Istio revisions whose istiod service names go into the istiod certificate.",
        ("default",),
        group="controllers",
        kind="list",
    ),
    Option(
        "istiod-cert-duration",
        "Lifetime of the istiod certificate.",
        timedelta(hours=1),
        group="controllers",
        kind="duration",
    ),
    Option(
        "istiod-cert-renew-before",
        "Renew the istiod certificate this long before it expires.",
        timedelta(minutes=30),
        group="controllers",
        kind="duration",
    ),
    Option(
        "istiod-cert-key-type",
        "istiod key: rsa2048, rsa3072, rsa4096, ec-p256, ec-p384.",
        "rsa2048",
        group="controllers",
    ),
    Option(
        "istiod-additional-dns-names",
        "Extra DNS names in the istiod certificate.",
        (),
        group="controllers",
        kind="list",
    ),
    # --- runtime issuer
    Option(
        "runtime-issuer-configmap",
        "NS/NAME of a ConfigMap selecting the active issuer at run time (keys: issuer, issuer options, "
        "or istio-csr's issuer-name/issuer-kind/issuer-group); empty: off.",
        "",
        group="controllers",
        metavar="NS/NAME",
    ),
]

#: The Kubernetes CSR signer for istiod's EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API mode
#: (docs/istiod-external-ca.md). Off unless --k8s-signer-names is given.
SIGNER_OPTIONS = [
    Option(
        "k8s-signer-names",
        "Sign certificates.k8s.io CertificateSigningRequests of these signerNames (exact names, or DOMAIN/* "
        "for every signer under a domain): istiod's K8S_SIGNER and CERT_SIGNER_DOMAIN/<CertSigner>. "
        "Empty: the signer is off. Names under kubernetes.io are refused.",
        (),
        group="signer",
        kind="list",
    ),
    Option(
        "k8s-signer-requesters",
        "Users whose CSRs are signed (spec.username, set by the apiserver); any other requester's CSR gets "
        "a Failed condition.",
        ("system:serviceaccount:istio-system:istiod",),
        group="signer",
        kind="list",
    ),
    Option(
        "k8s-signer-issuers-file",
        "TOML file with one table per signerName choosing its issuer, in the keys of the runtime issuer "
        'ConfigMap (issuer = "vault", vault-role = ..., root-ca-file = ...); signer names not in it sign '
        "with --issuer. Empty: every signer name signs with --issuer.",
        "",
        group="signer",
        kind="path",
    ),
    Option(
        "k8s-signer-istiod-signer-names",
        "Signer names on which istiod's own serving certificate (DNS names only, PILOT_CERT_PROVIDER="
        "k8s.io/<name>) may be signed. Empty: such CSRs get Failed.",
        (),
        group="signer",
        kind="list",
    ),
    Option(
        "k8s-signer-istiod-dns-names",
        "DNS names istiod's own certificate may carry; empty: istiod.<ns>.svc (istiod-<rev>.<ns>.svc for "
        "other --istio-revisions), istiod-remote.<ns>.svc and istio-pilot.<ns>.svc of --istio-namespace, "
        "the names istiod asks for.",
        (),
        group="signer",
        kind="list",
    ),
    Option(
        "k8s-signer-istiod-max-duration",
        "Upper bound on istiod's own certificate (istiod asks for 10 years and renews at half the lifetime).",
        timedelta(days=30),
        group="signer",
        kind="duration",
    ),
    Option(
        "k8s-signer-workers",
        "CSRs signed in parallel.",
        16,
        group="signer",
        kind="int",
    ),
]
