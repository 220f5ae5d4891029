"""The container-image part of the test bed, without building anything: keys, context, failures.

The image itself is tested by ``tests/image`` (marker ``image``); these check what decides when it
is rebuilt and what happens where it cannot be built.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed import containers, install

ROOT = Path(__file__).resolve().parents[2]


def test_context_is_what_dockerignore_lets_in() -> None:
    """The image's cache key hashes the files podman sends: the allow-list in .dockerignore."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == set(containers.CONTEXT)
    files = {str(f.relative_to(ROOT)) for f in containers.context_files()}
    assert "csr_service/cli.py" in files
    assert "issuers/vault/__init__.py" in files
    assert not any(f.startswith("tests/") or "__pycache__" in f for f in files)


def test_a_changed_source_file_changes_the_image_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name in (*containers.CONTEXT, "Dockerfile", ".dockerignore"):
        src = ROOT / name
        if src.is_dir():
            (tree / name).mkdir(parents=True)
            (tree / name / "mod.py").write_text("x = 1\n")
        else:
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_text(src.read_text())
    monkeypatch.setattr(containers, "ROOT", tree)  # not a git checkout: revision "unknown"
    first = containers.image_fingerprint()
    assert containers.image_fingerprint() == first, "stable for an unchanged tree"
    (tree / "csr_service" / "__pycache__").mkdir()
    (tree / "csr_service" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    assert containers.image_fingerprint() == first, "bytecode is not part of the context"
    (tree / "csr_service" / "mod.py").write_text("x = 2\n")
    assert containers.image_fingerprint() != first
    assert containers.git_revision() == "unknown"


def test_the_image_component_is_keyed_by_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containers, "image_fingerprint", lambda: "abc")
    assert install.COMPONENTS["image"].key == f"image-{install.project_version()}-srcabc"
    assert install.COMPONENTS["image"].group == "image"
    assert {c.name for c in install.COMPONENTS.values() if c.group == "image"} == {
        "container-tools",
        "python-base",
        "image",
    }


def test_not_root_is_an_install_error_that_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(containers, "missing_packages", lambda: ["podman"])
    with pytest.raises(install.InstallError, match=r"installing podman needs root"):
        containers.install_tools(tmp_path, tmp_path / "log")
    # Installed already, still not root: the test bed runs podman rootful only.
    monkeypatch.setattr(containers, "missing_packages", list)
    with pytest.raises(install.InstallError, match=r"podman for the test bed needs root"):
        containers.install_tools(tmp_path, tmp_path / "log")
    with pytest.raises(install.InstallError, match=r"needs root"):
        containers.podman("images")


def test_no_apt_is_an_install_error_that_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = containers.shutil.which
    monkeypatch.setattr(containers.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    with pytest.raises(install.InstallError, match=r"no apt-get/dpkg: install podman"):
        containers.install_tools(tmp_path, tmp_path / "log")


def test_image_tests_fail_not_skip_where_the_image_cannot_be_built(tmp_path: Path) -> None:
    """pytest as a non-root user (geteuid patched; nothing is installed): the image tests fail
    with the reason, the run fails, nothing is skipped."""
    code = (
        "import os, sys, pytest; os.geteuid = lambda: 1000; "
        "sys.exit(pytest.main(['-p', 'no:cacheprovider', '-q', '-rA', 'tests/image', '-k', 'probes or version']))"
    )
    env = {**os.environ, "CSR_SERVICE_TESTBED_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "2 errors" in out, out
    assert "skipped" not in out
    assert "the container image could not be built, so it was not tested" in out
    assert "needs root" in out or "no apt-get/dpkg" in out  # the latter on a machine without apt
