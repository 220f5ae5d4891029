"""Build istio-csr v0.17.0 (``github.com/cert-manager/istio-csr/cmd``) for the side-by-side benchmark.

    python -m bench.istio_csr_build        # prints the binary's path, or why it cannot be built
    python -m bench.istio_csr_build model  # builds bench/istio_csr_model instead (see below)

Same cache layout as the test bed (``~/.cache/csr-service/testbed/istio-csr-v0.17.0/``, or
``$CSR_SERVICE_TESTBED_CACHE``), built into a staging directory renamed into place, so an
interrupted build never looks cached. An optional bench component, never part of ``make test``.
The module proxy reachable from our build machines refuses istio-csr (403), so it is built from
its v0.17.0 source tarball (``../shared/peers/istio-csr-v0.17.0.tar.gz`` beside the repo, or
``$ISTIO_CSR_SOURCE``) with the two pins the proxy refuses moved to the versions it serves;
with neither, ``go install <module>/cmd@v0.17.0``. :func:`ensure_istio_csr_model` builds
``bench/istio_csr_model``: istio-csr's per-request API work (TokenReview, create,
per-request watch, GET, async delete) re-implemented in Go with the same libraries; the
benchmark labels its figures as the model's, never as istio-csr's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULE = "github.com/cert-manager/istio-csr/cmd"
VERSION = "v0.17.0"
NAME = "istio-csr"

MODEL_DIR = Path(__file__).resolve().parent / "istio_csr_model"
#: istio-csr v0.17.0's source (Apache-2.0, tag v0.17.0, commit d8fadec3b039), kept beside the repo.
SOURCE_TARBALL = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "istio-csr-v0.17.0.tar.gz"
#: Its pins that the module proxy refuses, moved to the versions it serves (the test bed's).
PROXY_PINS = (
    "istio.io/istio@v0.0.0-20260827124520-eed52ebb66ad",
    "istio.io/client-go@v1.31.0-rc.0.0.20260824155257-512e1cfc6c15",
)

__all__ = ["IstioCsrUnavailable", "ensure_istio_csr", "ensure_istio_csr_model"]


class IstioCsrUnavailable(RuntimeError):
    """istio-csr could not be built; the message says why (e.g. the proxy refuses the module)."""


def _cache_root() -> Path:
    return Path(os.environ.get("CSR_SERVICE_TESTBED_CACHE") or str(Path.home() / ".cache/csr-service/testbed"))


def cache_dir() -> Path:
    return _cache_root() / f"{NAME}-{VERSION}"


def ensure_istio_csr() -> Path:
    """The istio-csr binary, built on first use; IstioCsrUnavailable if that is impossible.

    From the module proxy when it serves istio-csr, else from the source tarball
    (:data:`SOURCE_TARBALL`, or ``$ISTIO_CSR_SOURCE``): the proxy reachable from our build
    machines refuses the module (403), so its v0.17.0 source is kept beside the repo.
    """
    final = cache_dir() / NAME
    if final.exists():
        return final
    if shutil.which("go") is None:
        raise IstioCsrUnavailable("go is not installed")
    tarball = Path(os.environ.get("ISTIO_CSR_SOURCE") or SOURCE_TARBALL)
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=final.parent.parent, prefix=f".{NAME}-") as staging:
        if tarball.exists():
            say = f"[bench] building istio-csr {VERSION} from {tarball} (~12 min cold) ..."
            print(say, file=sys.stderr, flush=True)
            built = _build_from_source(tarball, Path(staging))
        else:
            print(f"[bench] building istio-csr {VERSION} ({MODULE}) ...", file=sys.stderr, flush=True)
            env = {**os.environ, "GOBIN": staging, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
            _go(["go", "install", f"{MODULE}@{VERSION}"], env=env)
            built = Path(staging) / "cmd"  # go names the binary after the package directory
        final.parent.mkdir(parents=True, exist_ok=True)
        built.replace(final)
    print(f"[bench] built istio-csr in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return final


def _go(cmd: list[str], *, env: dict[str, str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IstioCsrUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-1500:]}")


def _build_from_source(tarball: Path, staging: Path) -> Path:
    """``go build ./cmd`` in an unpacked copy, after moving the two pins the proxy refuses to
    the versions it serves (TESTBED.md: no source change)."""
    import tarfile

    with tarfile.open(tarball) as tar:
        tar.extractall(staging, filter="data")
    tops = [p for p in staging.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "go.mod").exists():
        raise IstioCsrUnavailable(f"{tarball}: expected one source folder with a go.mod")
    src = tops[0]
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false", "GOWORK": "off"}
    env.setdefault("GOPROXY", "https://proxy.golang.org")
    _go(["go", "mod", "edit", *(f"-require={pin}" for pin in PROXY_PINS)], env=env, cwd=src)
    _go(["go", "mod", "tidy"], env=env, cwd=src)
    out = staging / NAME
    _go(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "./cmd"], env=env, cwd=src)
    return out


def ensure_istio_csr_model() -> Path:
    """The model binary, built from ``bench/istio_csr_model`` (cached by a hash of its sources)."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((MODEL_DIR / name).read_bytes())
    final = _cache_root() / f"istio-csr-model-src{digest.hexdigest()[:10]}" / "istio-csr-model"
    if final.exists():
        return final
    if shutil.which("go") is None:
        raise IstioCsrUnavailable("go is not installed")
    final.parent.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print("[bench] building bench/istio_csr_model ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=final.parent.parent, prefix=".istio-csr-model-") as staging:
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -buildvcs=false"}
        out = Path(staging) / "istio-csr-model"
        proc = subprocess.run(
            ["go", "build", "-o", str(out), "."], cwd=MODEL_DIR, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise IstioCsrUnavailable(f"building bench/istio_csr_model failed: {proc.stderr.strip()[-1500:]}")
        final.parent.mkdir(parents=True, exist_ok=True)
        out.replace(final)
    print(f"[bench] built the istio-csr model in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return final


if __name__ == "__main__":
    try:
        print(ensure_istio_csr_model() if sys.argv[1:] == ["model"] else ensure_istio_csr())
    except IstioCsrUnavailable as exc:
        print(f"istio-csr unavailable: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
