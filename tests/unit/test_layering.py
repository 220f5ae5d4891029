"""Dependencies point down: the folder layout is the architecture, and this test keeps it so.

Every ``import`` in ``csr_service`` and ``issuers`` (including imports inside functions and
under ``TYPE_CHECKING``) is read from the source and checked against three rules:

1. csr_service's packages form layers; a module imports only from its own layer or below.
2. The core never imports a backend (the top-level ``issuers`` package).
3. A backend imports only the public plugin surface of csr_service (listed in
   ``csr_service/plugins/__init__.py``) and other backends' shared code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Low to high. Packages of one layer may not import each other, except as listed in SIDEWAYS.
LAYERS: dict[str, int] = {
    "common": 0,  # vocabulary: errors, identity, options, lifecycle, readiness, request context
    "infra": 1,  # plumbing: HTTP client, CPU offload, files, logs, metrics
    "pki": 1,  # X.509 helpers
    "kube": 2,  # Kubernetes clients, informers, caches
    "plugins": 3,  # contracts, registry, Runtime
    "trust": 3,  # the trust bundle and its sources
    "pipeline": 4,  # the request path (and the built-in authenticators)
    "transport": 5,  # gRPC and HTTP servers, the serving certificate
    "controllers": 6,  # Kubernetes controllers
    "config": 7,  # the validated configuration
    "service": 8,  # wiring, supervisor, health
    "client": 8,  # `csr-service request`, an istio-agent-like client
    "agent": 9,  # `csr-service agent`: the client above, run as a long-lived certificate keeper
    "cli": 10,
    "__main__": 11,
    "_generated": 0,
    "__init__": 0,
}
#: Allowed imports between packages of the same layer: none today.
SIDEWAYS: set[tuple[str, str]] = set()

#: What a backend may import from csr_service (see csr_service/plugins/__init__.py).
PUBLIC_SURFACE = (
    "csr_service.common.",
    "csr_service.plugins.",
    "csr_service.pki.",
    "csr_service.kube.",
    "csr_service.infra.httpclient",
    "csr_service.infra.cpu",
)


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_generated" in path.parts:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_csr_service_package_has_a_layer() -> None:
    packages = {_layer(m) for m, _ in _modules("csr_service")}
    assert packages <= set(LAYERS), f"give these a layer in LAYERS: {sorted(packages - set(LAYERS))}"


@pytest.mark.parametrize(("module", "path"), list(_modules("csr_service")), ids=lambda v: str(v))
def test_core_imports_point_down_and_never_at_a_backend(module: str, path: Path) -> None:
    here = _layer(module)
    for target in _imports(path):
        top = target.split(".")[0]
        assert top != "issuers", f"{module} imports the backend {target}: the core must not know its plugins"
        if top != "csr_service" or target == "csr_service.__version__":
            continue
        there = _layer(target)
        if there in (here, "__init__") or target.startswith("csr_service._generated"):
            continue
        assert (LAYERS[there] < LAYERS[here]) or (here, there) in SIDEWAYS, (
            f"{module} (layer {here}) imports {target} (layer {there}): dependencies must point down"
        )


@pytest.mark.parametrize(("module", "path"), list(_modules("issuers")), ids=lambda v: str(v))
def test_backends_use_only_the_public_plugin_surface(module: str, path: Path) -> None:
    for target in _imports(path):
        if target.split(".")[0] == "csr_service":
            assert target.startswith(PUBLIC_SURFACE), (
                f"{module} imports {target}, which is not part of csr-service's plugin surface "
                "(csr_service/plugins/__init__.py lists it)"
            )


def test_a_violation_is_noticed(tmp_path: Path) -> None:
    """The checks above read real imports: an upward one in a scratch module is found."""
    scratch = tmp_path / "m.py"
    scratch.write_text("def f():\n    from csr_service.service.wiring import build_service\n")
    assert "csr_service.service.wiring" in set(_imports(scratch))
    assert LAYERS[_layer("csr_service.service.wiring")] > LAYERS["pipeline"]
