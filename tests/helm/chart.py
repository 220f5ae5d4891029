"""Render the chart and work with the manifests (shared by the chart tests)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.helm.tools import KUBE_VERSION, ensure_tool

CHART = Path(__file__).resolve().parents[2] / "helm" / "csr-service"

Manifest = dict[str, Any]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the test-bed helm; returns the completed process (raises on failure when ``check``)."""
    proc = subprocess.run([str(ensure_tool("helm")), *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _values_file(values: Mapping[str, Any]) -> Path:
    fh = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115 (helm reads it by path)
    with fh:
        json.dump(values, fh)
    return Path(fh.name)


def render(
    values: Mapping[str, Any], *, namespace: str = "cert-manager", release: str = "csr-service"
) -> list[Manifest]:
    """``helm template`` with ``values``; returns the manifests as dicts."""
    path = _values_file(values)
    try:
        out = helm("template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION, "-f", str(path))
    finally:
        path.unlink()
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def template_error(values: Mapping[str, Any]) -> str:
    """``helm template`` that must fail; returns its error output."""
    path = _values_file(values)
    try:
        proc = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(path), check=False)
    finally:
        path.unlink()
    assert proc.returncode != 0, f"helm template accepted {values}"
    return proc.stderr


def of_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if name is None or m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def container_args(manifests: Iterable[Manifest]) -> list[str]:
    """The csr-service container's command-line flags."""
    return list(one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])


def flags(manifests: Iterable[Manifest]) -> dict[str, str]:
    """``--name=value`` flags as a dict."""
    out: dict[str, str] = {}
    for arg in container_args(manifests):
        name, _, value = arg.partition("=")
        out[name.removeprefix("--")] = value
    return out


def rules(manifests: Iterable[Manifest]) -> list[tuple[str, str, str, frozenset[str], tuple[str, ...]]]:
    """Every RBAC rule as (scope namespace or '*', apiGroup, resource, verbs, resourceNames)."""
    out = []
    for m in manifests:
        if m["kind"] not in {"ClusterRole", "Role"}:
            continue
        scope = m["metadata"].get("namespace", "*") if m["kind"] == "Role" else "*"
        for rule in m.get("rules", []):
            for group in rule.get("apiGroups", ["-"]):
                for resource in rule.get("resources", rule.get("nonResourceURLs", [])):
                    names = tuple(rule.get("resourceNames", ()))
                    out.append((scope, group, resource, frozenset(rule["verbs"]), names))
    return out
