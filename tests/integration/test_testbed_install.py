"""The installer's own contract: atomic, cached, named failures, versions matching go.mod."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from tests.testbed import install


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """A registered fake component ``fake`` whose build records each call."""
    calls: list[str] = []

    def build(stage: Path, log: Path) -> None:
        calls.append(str(stage))
        if (tmp_path / "fail").exists():
            raise install.InstallError("the fake build broke")
        (stage / "fake-bin").write_text("#!/bin/sh\n")

    monkeypatch.setenv("CSR_SERVICE_TESTBED_CACHE", str(tmp_path / "cache"))
    comp = install.Component("fake", "v1.2.3", "fake-bin", build)
    monkeypatch.setitem(install.COMPONENTS, "fake", comp)
    monkeypatch.setitem(install._LOCAL_LOCKS, "fake", threading.Lock())
    monkeypatch.setattr(install, "_FAILED", {})
    return calls


def test_builds_once_then_uses_the_cache(fake: list[str], tmp_path: Path) -> None:
    path = install.ensure("fake")

    assert path == tmp_path / "cache" / "fake-v1.2.3" / "fake-bin"
    assert path.exists()
    assert install.is_cached("fake")
    assert install.ensure("fake") == path
    assert len(fake) == 1
    # The staging directory was renamed into place, nothing temporary is left behind.
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_failure_names_the_component_and_is_not_cached(fake: list[str], tmp_path: Path) -> None:
    (tmp_path / "fail").touch()
    # A leftover from a killed build must not count as cached, and is cleaned up.
    (tmp_path / "cache" / ".tmp-fake-v1.2.3-killed").mkdir(parents=True)

    with pytest.raises(install.InstallError, match=r"test-bed component fake v1\.2\.3 failed: the fake build broke"):
        install.ensure("fake")

    assert not install.is_cached("fake")
    assert not list((tmp_path / "cache").glob(".tmp-*"))
    # The failure is remembered for this process: no second 15-minute attempt.
    with pytest.raises(install.InstallError):
        install.ensure("fake")
    assert len(fake) == 1


def test_unknown_component_is_named() -> None:
    with pytest.raises(install.InstallError, match="unknown test-bed component 'nope'"):
        install.ensure("nope")


def _required(go_mod: Path, module: str) -> str:
    m = re.search(rf"^\s*{re.escape(module)} (\S+)", go_mod.read_text(), re.MULTILINE)
    assert m, f"{module} not required in {go_mod}"
    return m.group(1)


def test_versions_match_the_go_modules() -> None:
    kube_mod = install.GO_DIR / "kube" / "go.mod"
    clients_mod = install.GO_DIR / "clients" / "go.mod"
    assert _required(kube_mod, "k8s.io/kubernetes") == install.KUBERNETES_VERSION
    assert _required(kube_mod, "go.etcd.io/etcd/server/v3") == install.ETCD_VERSION
    minor = install.KUBERNETES_VERSION.replace("v1.", "v0.", 1)
    assert f"k8s.io/client-go => k8s.io/client-go {minor}" in kube_mod.read_text()
    assert _required(clients_mod, "github.com/cert-manager/cert-manager") == install.CERT_MANAGER_VERSION
    assert _required(clients_mod, "istio.io/istio") == install.ISTIO_VERSION
