"""The example manifests of docs/agent.md are valid YAML whose agent containers use only flags
``csr-service agent`` accepts, and the Secret writer's Role is the least it needs (the
integration test tests/integration/test_agent_secret.py runs the agent with exactly this Role)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from csr_service.cli import make_parser

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "agent"


def _objects(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def _agent_containers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for obj in objs:
        if obj["kind"] == "Deployment":
            spec = obj["spec"]["template"]["spec"]
            for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
                if c.get("args", [None])[0] == "agent":
                    found.append(c)
    return found


@pytest.mark.parametrize("name", ["file-sharing-sidecar.yaml", "gateway-secret-writer.yaml"])
def test_agent_args_parse(name: str) -> None:
    containers = _agent_containers(_objects(name))
    assert len(containers) == 1
    # The image's entrypoint is `csr-service serve` (Dockerfile): the agent needs its own command.
    assert containers[0]["command"] == ["csr-service"]
    args = make_parser().parse_args(containers[0]["args"])
    assert args.command == "agent"
    probes = {containers[0][p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"/readyz", "/healthz"}


def test_file_sharing_sidecar_needs_no_rbac() -> None:
    kinds = {o["kind"] for o in _objects("file-sharing-sidecar.yaml")}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}


def test_secret_writer_role_is_namespaced_and_minimal() -> None:
    objs = _objects("gateway-secret-writer.yaml")
    assert not {o["kind"] for o in objs} & {"ClusterRole", "ClusterRoleBinding"}
    (role,) = [o for o in objs if o["kind"] == "Role"]
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    args = make_parser().parse_args(_agent_containers(objs)[0]["args"])
    assert deploy["spec"]["replicas"] == 2
    grants = {
        (res, verb, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    assert grants == {
        ("secrets", "get", (args.output_secret,)),
        ("secrets", "update", (args.output_secret,)),
        ("secrets", "create", ()),
        ("leases", "get", (args.leader_election_id,)),
        ("leases", "update", (args.leader_election_id,)),
        ("leases", "create", ()),
        ("events", "create", ()),
    }
