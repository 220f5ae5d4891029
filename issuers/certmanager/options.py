"""Options of the cert-manager issuer (no heavy imports here; see csr_service.plugins.registry).

Names follow istio-csr's where the meaning is the same (``app.certmanager.namespace`` →
``--certmanager-namespace``, ``app.certmanager.issuer.name`` → ``--certmanager-issuer-name``,
``app.certmanager.preserveCertificateRequests`` → ``--preserve-certificate-requests``, ...),
so operators can carry their values over.
"""

from datetime import timedelta

from csr_service.common.options import Option

__all__ = ["OPTIONS"]

_G = "cert-manager"

OPTIONS = [
    Option(
        "certmanager-namespace",
        "Namespace the CertificateRequests are created in (the Issuer's namespace for kind Issuer).",
        "istio-system",
        group=_G,
    ),
    Option("certmanager-issuer-name", "Name of the issuer that signs (issuerRef.name).", "istio-ca", group=_G),
    Option(
        "certmanager-issuer-kind",
        "issuerRef.kind: Issuer, ClusterIssuer, or an external issuer's kind.",
        "Issuer",
        group=_G,
    ),
    Option(
        "certmanager-issuer-group",
        "issuerRef.group: cert-manager.io, or an external issuer's API group.",
        "cert-manager.io",
        group=_G,
    ),
    Option(
        "certmanager-serving-issuer-name",
        "Issuer for csr-service's own certificates (serving, istiod-tls: DNS names) when the workload issuer "
        "allows SPIFFE URIs only; empty: --certmanager-issuer-name.",
        "",
        group=_G,
    ),
    Option(
        "certmanager-serving-issuer-kind",
        "issuerRef.kind of --certmanager-serving-issuer-name; empty: --certmanager-issuer-kind.",
        "",
        group=_G,
    ),
    Option(
        "certmanager-serving-issuer-group",
        "issuerRef.group of --certmanager-serving-issuer-name; empty: --certmanager-issuer-group.",
        "",
        group=_G,
    ),
    Option(
        "preserve-certificate-requests",
        "Keep CertificateRequests after they are finished (for auditing); the sweeper is then off too.",
        False,
        group=_G,
        kind="bool",
    ),
    Option(
        "certmanager-additional-annotations",
        "Extra annotations on every CertificateRequest, as comma-separated key=value pairs.",
        (),
        group=_G,
        kind="list",
        metavar="KEY=VALUE,...",
    ),
    Option(
        "certmanager-timeout",
        "How long a request may wait to be approved and signed before DEADLINE_EXCEEDED; "
        "keep it below --request-timeout so the error says which step stalled.",
        timedelta(seconds=8),
        group=_G,
        kind="duration",
    ),
    Option(
        "certmanager-sweep-age",
        "The sweeper deletes our CertificateRequests older than this (leftovers of a crash); 0 disables it.",
        timedelta(minutes=15),
        group=_G,
        kind="duration",
    ),
    Option(
        "certmanager-sweep-interval",
        "How often the sweeper looks for leftovers (one replica-wide pass, worker 0 only).",
        timedelta(minutes=5),
        group=_G,
        kind="duration",
    ),
    Option(
        "certmanager-trust-status-ca",
        "Trust the CA that cert-manager reports in status.ca as a root (trust on first use; status.ca "
        "may be an intermediate). Off: only --root-ca-file is trusted.",
        False,
        group=_G,
        kind="bool",
    ),
]
