"""The Helm chart: lint, schema, a matrix of renders, and a server-side dry run of each render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.dynamic import DynamicClient

from tests.helm.chart import CHART, container_args, flags, helm, of_kind, one, render, rules, template_error
from tests.testbed.kube import KubeCluster, unique_name

pytestmark = pytest.mark.helm

CERT_MANAGER: dict[str, Any] = {"app": {"issuer": "cert-manager"}}
VAULT: dict[str, Any] = {
    "app": {
        "issuer": "vault",
        "vault": {
            "address": "https://vault.vault.svc:8200",
            "role": "istio",
            "servingRole": "istio-serving",
            "kubernetesRole": "csr-service",
            "caBundleSecret": "vault-ca",
        },
        "tls": {"rootCASecret": "vault/vault-root:ca.crt"},
    }
}
LOCAL: dict[str, Any] = {"app": {"issuer": "local", "local": {"secretName": "istio-ca"}}}
IMPERSONATION: dict[str, Any] = {"app": {"server": {"caTrustedNodeAccounts": "istio-system/ztunnel"}}}
HA: dict[str, Any] = {"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": 1}}
SINGLE: dict[str, Any] = {"replicaCount": 1, "podDisruptionBudget": {"enabled": False}}


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


MATRIX = {
    f"{issuer}-{imp}-{ha}": merge(values, extra, topology)
    for issuer, values in {"cert-manager": CERT_MANAGER, "vault": VAULT, "local": LOCAL}.items()
    for imp, extra in {"impersonation": IMPERSONATION, "no-impersonation": {}}.items()
    for ha, topology in {"ha": HA, "single": SINGLE}.items()
}


def test_lint(tmp_path: Path) -> None:
    out = helm("lint", str(CHART), "--strict", "--kube-version", "1.36.0")
    assert "0 chart(s) failed" in out.stdout
    for name, values in (("local", LOCAL), ("vault", VAULT)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        out = helm("lint", str(CHART), "--strict", "--kube-version", "1.36.0", "-f", str(path))
        assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"app": {"tls": {"trustDomian": "x"}}}, "additional properties 'trustDomian' not allowed"),
        ({"replicaCount": "two"}, "got string, want integer"),
        ({"app": {"issuer": "acme"}}, "value must be one of"),
        ({"app": {"server": {"maxCertificateDuration": "one hour"}}}, "does not match pattern"),
        ({"app": {"server": {"caTrustedNodeAccounts": "ztunnel"}}}, "does not match pattern"),
        ({"app": {"logFormat": "xml"}}, "value must be one of"),
        ({"app": {"server": {"grpcTransport": "h2"}}}, "value must be one of"),
        (
            {"app": {"server": {"grpcTransport": "native", "authenticators": ["client-cert", "tokenreview"]}}},
            "grpcTransport native does not serve the client-certificate (mTLS) listener",
        ),
        ({"app": {"extraArgs": ["serve"]}}, "does not match pattern"),
        ({"app": {"issuer": "local"}}, "app.local.secretName is required"),
        ({"app": {"issuer": "vault"}}, "app.vault.address is required"),
        ({"app": {"server": {"authenticators": ["client-cert", "oidc"]}}}, "value must be one of"),
        (
            {"app": {"multicluster": {"enabled": True}, "server": {"authenticator": "jwks"}}},
            "app.multicluster.enabled needs tokenreview",
        ),
    ],
)
def test_bad_values_are_rejected(values: dict[str, Any], message: str) -> None:
    assert message in template_error(values)


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_render_matrix(case: str) -> None:
    values = MATRIX[case]
    manifests = render(values)
    f = flags(manifests)
    deploy = one(manifests, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    ctr = pod["containers"][0]

    # Hardening and probes, whatever the values.
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert ctr["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert ctr["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert ctr["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert "startupProbe" in ctr
    assert {"name": "tmp", "mountPath": "/tmp"} in ctr["volumeMounts"]

    # Istio's caAddress: csr-service.cert-manager.svc:443 -> the gRPC port, with a matching SAN.
    svc = one(manifests, "Service", "csr-service")
    assert svc["spec"]["ports"][0]["port"] == 443
    assert svc["spec"]["ports"][0]["targetPort"] == "grpc"
    assert f["serving-dns-names"] == "csr-service.cert-manager.svc"
    assert one(manifests, "Service", "csr-service-metrics")["spec"]["ports"][0]["port"] == 9402
    assert f["http-listen"] == "0.0.0.0:9402"

    issuer = values["app"]["issuer"]
    assert f["issuer"] == issuer
    granted = rules(manifests)
    resources = {(g, r) for _, g, r, _, _ in granted}
    assert (("cert-manager.io", "certificaterequests") in resources) == (issuer == "cert-manager")
    if issuer == "cert-manager":
        [cr] = [r for r in granted if r[2] == "certificaterequests"]
        assert cr[0] == "istio-system"  # one namespace, never cluster-wide
    impersonation = "caTrustedNodeAccounts" in values["app"].get("server", {})
    assert (("", "pods") in resources) == impersonation
    assert ("ca-trusted-node-accounts" in f) == impersonation

    # Secrets: only istiod-tls by name (plus create, which cannot be limited by name), never cluster-wide.
    for scope, _, resource, verbs, names in granted:
        if resource == "secrets":
            assert scope != "*"
            assert names in {("istiod-tls",), ("vault-root",)} or verbs == {"create"}
        assert "*" not in verbs
        assert resource != "*"

    pdb = of_kind(manifests, "PodDisruptionBudget")
    assert deploy["spec"]["replicas"] == values["replicaCount"]
    if values["replicaCount"] > 1:
        assert pdb[0]["spec"] == {"maxUnavailable": 1, "selector": pdb[0]["spec"]["selector"]}
        assert f["leader-election"] == "true"
    else:
        assert pdb == []


def test_features_off_grant_nothing() -> None:
    values = merge(
        LOCAL,
        {
            "app": {
                "server": {"authenticator": "jwks"},
                "tls": {"istiodCertificateEnable": False},
                "controller": {"rootConfigMaps": False},
            }
        },
    )
    manifests = render(values)
    granted = rules(manifests)
    # jwks: only the issuer discovery documents; no leader election without leader-only work.
    assert {(r[2], tuple(sorted(r[3]))) for r in granted} == {
        ("/.well-known/openid-configuration", ("get",)),
        ("/openid/v1/jwks", ("get",)),
    }
    f = flags(manifests)
    assert f["leader-election"] == "false"
    assert f["root-configmaps"] == "false"
    assert f["istiod-cert"] == "false"


def test_migrated_istio_csr_values() -> None:
    """istio-csr keys with the same meaning work unchanged (docs/operations.md, migration)."""
    app = {
        "logFormat": "json",
        "server": {"clusterID": "east", "maxCertificateDuration": "2h"},
        "tls": {"trustDomain": "example.org", "rootCAFile": "/var/run/secrets/istio-csr/ca.pem"},
        "certmanager": {"namespace": "istio-system", "issuer": {"name": "istio-ca", "kind": "Issuer"}},
        "controller": {"leaderElectionNamespace": "istio-system"},
        "istio": {"namespace": "istio-system", "revisions": ["default", "1-30"]},
        "metrics": {"port": 9402},
    }
    app["server"]["caTrustedNodeAccounts"] = "istio-system/ztunnel"  # type: ignore[index]
    app["certmanager"]["issuer"]["group"] = "cert-manager.io"  # type: ignore[index]
    app["controller"]["configmapNamespaceSelector"] = "maistra.io/member-of=istio-system"  # type: ignore[index]
    values = {"app": app}
    f = flags(render(values))
    assert f["cluster-id"] == "east"
    assert f["max-certificate-duration"] == "2h"
    assert f["trust-domain"] == "example.org"
    assert f["root-ca-file"] == "/var/run/secrets/istio-csr/ca.pem"
    assert "root-ca-configmap" not in f
    assert f["root-configmap-namespace-selector"] == "maistra.io/member-of=istio-system"
    assert f["istio-revisions"] == "default,1-30"
    assert f["log-format"] == "json"


def test_every_flag_exists() -> None:
    """The chart passes only flags that `csr-service serve` knows (a typo would crash-loop the pod)."""
    from csr_service.config import all_options

    known = {o.name for o in all_options()}
    for values in MATRIX.values():
        for arg in container_args(render(values)):
            assert arg.startswith("--")
            assert arg[2:].partition("=")[0] in known, arg


@pytest.mark.kube
@pytest.mark.parametrize("case", sorted(MATRIX))
def test_server_side_dry_run(kube: KubeCluster, case: str) -> None:
    """Every rendered object is accepted by the real apiserver (schema, defaults, admission)."""
    namespace = unique_name("csr")
    manifests = render(MATRIX[case], namespace=namespace, release=unique_name("rel"))
    for ns in {namespace, "istio-system", "vault"}:
        if ns not in {n.metadata.name for n in kube.core.list_namespace().items}:
            kube.create_namespace(ns)
    dyn = DynamicClient(kube.api_client)
    for m in manifests:
        api = dyn.resources.get(api_version=m["apiVersion"], kind=m["kind"])
        try:
            api.create(body=m, namespace=m["metadata"].get("namespace"), query_params=[("dryRun", "All")])
        except k8s.ApiException as exc:
            raise AssertionError(f"{m['kind']} {m['metadata']['name']} rejected: {exc.body}") from exc


def test_servicemonitor_renders_when_enabled() -> None:
    """The ServiceMonitor needs prometheus-operator's CRD, which the test bed lacks: checked for shape only."""
    manifests = render(merge(CERT_MANAGER, {"app": {"metrics": {"service": {"servicemonitor": {"enabled": True}}}}}))
    sm = one(manifests, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "metrics"


def test_no_pdb_for_a_single_replica() -> None:
    """A PodDisruptionBudget over one replica would block every node drain."""
    assert of_kind(render(merge(CERT_MANAGER, {"replicaCount": 1})), "PodDisruptionBudget") == []
    assert len(of_kind(render(CERT_MANAGER), "PodDisruptionBudget")) == 1


def test_serving_issuer_for_cert_manager() -> None:
    """A second issuerRef for csr-service's own certificates (docs/cert-manager.md, the Vault recipe)."""
    serving = {"name": "vault-serving", "kind": "ClusterIssuer"}
    f = flags(render(merge(CERT_MANAGER, {"app": {"certmanager": {"servingIssuer": serving}}})))
    assert f["certmanager-serving-issuer-name"] == "vault-serving"
    assert f["certmanager-serving-issuer-kind"] == "ClusterIssuer"
    assert "certmanager-serving-issuer-group" not in f
    assert "certmanager-serving-issuer-name" not in flags(render(CERT_MANAGER))


def test_signer_values(tmp_path: Path) -> None:
    """app.signer: the flags exist, the per-signer issuers ConfigMap is a file `serve` accepts, and
    `sign` is granted on exactly the signer names."""
    from csr_service.cli import build_config
    from csr_service.config import all_options

    signers = ["mesh.example.com/workloads", "mesh.example.com/team-a"]
    team_a = {
        "issuer": "vault",
        "vault-address": "https://vault.vault.svc:8200",
        "vault-role": "team-a",
        "vault-auth": "kubernetes",
        "vault-kubernetes-role": "csr-service",
    }
    values = merge(LOCAL, {"app": {"signer": {"signerNames": signers, "issuers": {signers[1]: team_a}}}})
    manifests = render(values)
    f = flags(manifests)
    known = {o.name for o in all_options()}
    assert all(a[2:].partition("=")[0] in known for a in container_args(manifests))
    assert f["k8s-signer-names"] == ",".join(signers)
    assert f["grpc-listen"] == "0.0.0.0:6443"  # beside the gRPC service unless signerOnly
    assert f["leader-election"] == "true"
    toml = one(manifests, "ConfigMap", "csr-service-signer-issuers")["data"]["issuers.toml"]
    (tmp_path / "issuers.toml").write_text(toml)
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    config = build_config(
        {
            "k8s-signer-names": f["k8s-signer-names"],
            "k8s-signer-issuers-file": str(tmp_path / "issuers.toml"),
            "local-ca-dir": str(tmp_path),
            "jwt-jwks-file": str(tmp_path / "jwks.json"),
        }
    )
    assert config.controllers is not None
    assert config.controllers.signer is not None
    chosen = config.controllers.signer.issuers[signers[1]]
    assert (chosen.backend, chosen.values["vault-role"]) == ("vault", "team-a")
    sign = [r for r in rules(manifests) if r[2] == "signers"]
    assert sign == [("*", "certificates.k8s.io", "signers", frozenset({"sign"}), tuple(signers))]
    only = flags(render(merge(values, {"app": {"signer": {"signerOnly": True}}})))
    assert only["grpc-listen"] == ""


def test_client_cert_and_multicluster() -> None:
    values = merge(
        CERT_MANAGER,
        {"app": {"server": {"authenticators": ["client-cert", "tokenreview"]}, "multicluster": {"enabled": True}}},
    )
    manifests = render(values, namespace="mesh-ca")
    f = flags(manifests)
    assert f["authenticators"] == "client-cert,tokenreview"
    assert "authenticator" not in f
    assert f["client-cert-grpc-listen"] == "0.0.0.0:6444"
    assert f["multicluster-secrets"] == "true"
    svc = one(manifests, "Service", "csr-service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "grpc": (443, "grpc"),
        "grpc-mtls": (444, "grpc-mtls"),
    }
    ports = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "grpc-mtls", "containerPort": 6444, "protocol": "TCP"} in ports
    granted = rules(manifests)
    # The remote-cluster Secrets: read in the release namespace only, never cluster-wide.
    secrets = [r for r in granted if r[2] == "secrets" and r[3] == {"list", "watch"}]
    assert [(scope, names) for scope, _, _, _, names in secrets] == [("mesh-ca", ())]
    assert f["multicluster-namespace"] == "mesh-ca"
    assert ("*", "authentication.k8s.io", "tokenreviews", frozenset({"create"}), ()) in granted


def test_grpc_transport() -> None:
    assert flags(render(CERT_MANAGER))["grpc-transport"] == "auto"
    native = merge(CERT_MANAGER, {"app": {"server": {"grpcTransport": "native"}}})
    assert flags(render(native))["grpc-transport"] == "native"


def test_authenticator_alone_still_renders_as_before() -> None:
    f = flags(render(CERT_MANAGER))
    assert f["authenticator"] == "tokenreview"
    assert "authenticators" not in f
    assert "client-cert-grpc-listen" not in f
    assert "multicluster-secrets" not in f
