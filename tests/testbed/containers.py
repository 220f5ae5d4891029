"""Container images without a registry: podman from Debian, a local Python base, the project's image.

No container registry is reachable from the build machines, so nothing is pulled. Three test-bed
components (``tests/testbed/install.py``) build what the ``image`` tests need:

``container-tools``
    podman, runc and mmdebstrap from the machine's apt sources, installed only when missing.
    Needs root (apt-get, and rootful podman: see below); otherwise an ``InstallError`` says so.
``python-base``
    A stand-in for ``python:3.11-slim-bookworm`` (the Dockerfile's default ``PYTHON_IMAGE``):
    Debian bookworm's own Python 3.11 in a minimal root filesystem (``mmdebstrap``) with a venv
    at ``/usr/local``, so ``python``/``pip`` sit where the official image has them, imported
    with ``podman import``. Built once per recipe (the recipe text and the machine's extra CA
    certificates are its key). It answers "does the image work", not size or CVE questions
    about an image built on the official base.
``image``
    The project's image, built from the project's own ``Dockerfile`` with
    ``--build-arg PYTHON_IMAGE=<python-base>``, tagged ``csr-service:<version>`` (the Helm
    chart's default ``image.repository:tag``) and ``csr-service:<version>-src<hash>``. Keyed by a
    hash of the build context (exactly what ``.dockerignore`` lets in), the Dockerfile, the
    base and the git revision: a changed source tree or a new commit rebuilds, an unchanged one
    is reused without calling podman at all. Rebuilds reuse podman's layer cache.

podman runs with configuration files owned by the test bed (``CONTAINERS_CONF``,
``CONTAINERS_STORAGE_CONF``, ``CONTAINERS_REGISTRIES_CONF``), so it neither depends on nor
touches the machine's own podman setup: storage under ``<cache>/containers/storage``, run-time
state under ``/run/csr-service-testbed-<hash>``, no registry to search for short names, runc as
the runtime (crun fails on this machine's hybrid cgroups), the file descriptor limit at the
hard limit we have (podman's default asks for more and ``setrlimit`` fails), host networking
(the test bed never creates a network). Rootless podman would need vfs storage, subordinate
ids and a differently built base; it is not supported.

    python -m tests.testbed.containers build          # the image (what `make image` runs), and how to run it
    python -m tests.testbed.containers env            # the environment, as shell exports
    python -m tests.testbed.containers podman images  # podman with the test bed's configuration
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.install import InstallError, cache_root, project_version

ROOT = Path(__file__).resolve().parents[2]

#: Debian packages the image tests need. podman pulls conmon and containers-common; the CNI
#: plugins and iptables are only recommended but podman's network setup looks for them even
#: with host networking. runc: crun refuses this machine's hybrid cgroup layout.
DEBIAN_PACKAGES = ("podman", "runc", "mmdebstrap", "containernetworking-plugins", "iptables")
#: The program each package must provide, to tell "installed" from "half removed".
_PROGRAMS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap"}

#: The Dockerfile's default base is python:<BASE_PYTHON>-slim-<BASE_SUITE>; Debian <BASE_SUITE>
#: ships Python <BASE_PYTHON>, which is what makes the stand-in possible.
BASE_SUITE = "bookworm"
BASE_PYTHON = "3.11"
BASE_REPOSITORY = "localhost/csr-service-testbed/python"
#: What the image tests build and what the chart's default image.repository names.
IMAGE_REPOSITORY = "csr-service"
#: Used for org.opencontainers.image.source when the checkout has no `origin` remote.
DEFAULT_SOURCE = "https://github.com/csr-service/csr-service"

# The recipe of the base. Everything here is part of its cache key.
_BASE_INCLUDE = ("python3", "python3-venv", "ca-certificates", "passwd")
# Like Debian's slim images: no documentation, manual pages or translations (keep copyrights).
_BASE_DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
_BASE_HOOKS = (
    # The machine reaches PyPI through a proxy whose CA sits in the host's extra certificates:
    # the build stage's pip must trust what the host's pip trusts.
    'for c in /usr/local/share/ca-certificates/*.crt; do [ -e "$c" ] &&'
    ' cp "$c" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates',
    # python and pip in /usr/local/bin as in the official image, and no "externally managed"
    # refusal (a venv is not Debian's system Python as far as pip is concerned).
    'chroot "$1" python3 -m venv /usr/local',
    'printf "[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n" > "$1/etc/pip.conf"',
)
_BASE_CHANGES = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
#: The build context: what .dockerignore lets in (tests/unit/test_testbed_containers.py keeps
#: this list and .dockerignore in step).
CONTEXT = ("pyproject.toml", "setup.py", "README.md", "csr_service", "issuers")
_BUILD_FILES = ("Dockerfile", ".dockerignore")
#: Source-tagged project images older than this, beyond the newest few, are removed.
_KEEP_IMAGES = 3
_KEEP_SECONDS = 3600


# ------------------------------------------------------------------ podman's environment
def _short_hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:10]


def containers_dir() -> Path:
    """The test bed's podman directory: storage, generated configuration, network config."""
    return cache_root() / "containers"


def _run_dir() -> Path:
    # Run-time state must be on a tmpfs (podman detects a reboot by its disappearance); one per
    # cache root, since it belongs to that cache's storage.
    return Path("/run") / f"csr-service-testbed-{_short_hash(str(containers_dir()))}"


def require_root(what: str) -> None:
    """Raise ``InstallError`` unless we are root: the test bed runs podman rootful only."""
    if os.geteuid() != 0:
        raise InstallError(
            f"{what} needs root: the test bed installs podman with apt-get and runs it rootful "
            "(overlay storage, host networking). Run the image tests as root; rootless podman "
            "is not supported by the test bed."
        )


def _hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else int(hard)


def _write_if_changed(path: Path, text: str) -> Path:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: concurrent runs read a whole file
    return path


def podman_env() -> dict[str, str]:
    """The environment to run podman with the test bed's own configuration files."""
    base = containers_dir()
    conf = base / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (base / "net").mkdir(exist_ok=True)
    run = _run_dir()
    nofile = _hard_nofile()
    containers_conf = _write_if_changed(
        conf / f"containers-{nofile}.conf",
        "# Written by tests/testbed/containers.py; only podman runs of the test bed read it.\n"
        "[containers]\n"
        # Without this podman asks for more open files than the hard limit and runc fails
        # with `setrlimit RLIMIT_NOFILE: Operation not permitted`.
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
        'netns = "host"\n'
        "[network]\n"
        f'network_config_dir = "{base / "net"}"\n'
        "[engine]\n"
        # crun: `cgroups in hybrid mode not supported`.
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{run / "libpod"}"\n',
    )
    storage_conf = _write_if_changed(
        conf / "storage.conf",
        f'[storage]\ndriver = "overlay"\ngraphroot = "{base / "storage"}"\nrunroot = "{run / "storage"}"\n',
    )
    registries_conf = _write_if_changed(
        conf / "registries.conf",
        # Nothing is pulled: a short name never means docker.io, only what is in our storage.
        'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n',
    )
    return {
        **os.environ,
        "CONTAINERS_CONF": str(containers_conf),
        "CONTAINERS_STORAGE_CONF": str(storage_conf),
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
    }


def podman(*args: str, check: bool = True, timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
    """Run podman with the test bed's configuration; raises ``InstallError`` when ``check`` fails."""
    require_root("podman for the test bed")
    exe = shutil.which("podman")
    if exe is None:
        raise InstallError("podman is not installed (test-bed component container-tools installs it)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=podman_env(), timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise InstallError(f"podman {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        started = time.monotonic()
        proc = subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
        fh.write(f"# exit {proc.returncode} after {time.monotonic() - started:.1f}s\n")
    if proc.returncode != 0:
        raise InstallError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}")


# ------------------------------------------------------------------ container-tools
def missing_packages() -> list[str]:
    """The Debian packages of ``DEBIAN_PACKAGES`` that are not installed (or lost their program)."""
    missing = []
    for pkg in DEBIAN_PACKAGES:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], capture_output=True, text=True, check=False
        )
        installed = proc.returncode == 0 and proc.stdout.strip() == "installed"
        program = _PROGRAMS.get(pkg)
        if not installed or (program is not None and shutil.which(program) is None):
            missing.append(pkg)
    return missing


def tools_ok(_: Path) -> bool:
    """Whether the cached ``container-tools`` record still holds (nothing uninstalled since)."""
    return shutil.which("dpkg-query") is not None and not missing_packages()


def install_tools(stage: Path, log: Path) -> None:
    """Install the missing container tools with apt-get; record their versions."""
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        raise InstallError(
            "the container tools come from Debian packages, and this machine has no apt-get/dpkg: "
            f"install {', '.join(DEBIAN_PACKAGES)} (or their equivalents) by hand"
        )
    missing = missing_packages()
    if missing:
        require_root(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        # Other jobs on the machine may hold dpkg's lock for a while: wait for it, not fail.
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        _run_logged(["apt-get", *lock, "update", "-qq"], log, env)
        _run_logged(["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing], log, env)
        still = missing_packages()
        if still:
            raise InstallError(f"apt-get installed but {', '.join(still)} still missing")
    require_root("podman for the test bed")
    versions = {}
    for program in ("podman", "runc", "mmdebstrap"):
        proc = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
        versions[program] = (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else "?"
    (stage / "tools.json").write_text(json.dumps(versions, indent=2) + "\n")


# ------------------------------------------------------------------ python-base
def _host_sources() -> list[Path]:
    """The machine's own apt source files that name the base's suite (its mirror, its proxy)."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    files += sorted((apt / "sources.list.d").glob("*.sources"))
    return [f for f in files if f.is_file() and BASE_SUITE in f.read_text(errors="replace")]


def _host_ca_certs() -> list[Path]:
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def base_fingerprint() -> str:
    """Key of the base: its recipe and the extra CA certificates it copies from the machine."""
    parts: list[str | bytes] = [BASE_SUITE, BASE_PYTHON, *_BASE_INCLUDE, *_BASE_DPKG_OPTS, *_BASE_HOOKS]
    parts += list(_BASE_CHANGES)
    parts += [c.read_bytes() for c in _host_ca_certs()]
    return _short_hash(*parts)


def base_ref() -> str:
    """The local base's image reference (what ``--build-arg PYTHON_IMAGE`` gets)."""
    return f"{BASE_REPOSITORY}:{BASE_PYTHON}-slim-{BASE_SUITE}-{base_fingerprint()}"


def _image_present(record: Path) -> bool:
    try:
        ref = json.loads(record.read_text())["id"]
        return podman("image", "exists", ref, check=False).returncode == 0
    except (OSError, ValueError, KeyError, InstallError):
        return False


def base_ok(artifact: Path) -> bool:
    """Whether the cached base record still names an image in the test bed's storage."""
    return _image_present(artifact)


def build_base(stage: Path, log: Path) -> None:
    """mmdebstrap a minimal bookworm with Python into a tarball, import it as the base image."""
    from tests.testbed.install import ensure

    ensure("container-tools")
    rootfs = stage / "rootfs.tar"
    cmd = ["mmdebstrap", "--variant=minbase", f"--include={','.join(_BASE_INCLUDE)}"]
    cmd += [f"--dpkgopt={opt}" for opt in _BASE_DPKG_OPTS]
    cmd += [f"--customize-hook={hook}" for hook in _BASE_HOOKS]
    # No mirror named: mmdebstrap takes deb.debian.org (plus updates and security).
    cmd += [BASE_SUITE, str(rootfs), *(str(s) for s in _host_sources())]
    _run_logged(cmd, log)
    ref = base_ref()
    changes = [arg for change in _BASE_CHANGES for arg in ("--change", change)]
    _run_logged(["podman", "import", *changes, str(rootfs), ref], log, podman_env())
    rootfs.unlink()  # the storage holds it now
    image_id = podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
    (stage / "base.json").write_text(json.dumps({"ref": ref, "id": image_id}, indent=2) + "\n")


# ------------------------------------------------------------------ image
def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_revision() -> str:
    """The commit the build context comes from, ``-dirty`` when the context has local changes."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--", *CONTEXT, *_BUILD_FILES)
    return f"{head}-dirty" if dirty else head


def git_source() -> str:
    """The repository URL for org.opencontainers.image.source (``origin``, if it is a URL)."""
    url = _git("remote", "get-url", "origin") or ""
    return url if url.startswith(("https://", "http://")) else DEFAULT_SOURCE


def context_files() -> Iterator[Path]:
    """Every file the build context holds (what ``.dockerignore`` allows: no bytecode, no built extension)."""
    for name in CONTEXT:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                # Not bytecode, nor the C extension an editable install built in place.
                if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".so"):
                    yield f


@dataclass(frozen=True)
class BuildArgs:
    """What the project image is built from (and stamped with)."""

    version: str
    revision: str
    source: str
    base: str

    def as_flags(self) -> list[str]:
        pairs = {"PYTHON_IMAGE": self.base, "VERSION": self.version, "REVISION": self.revision, "SOURCE": self.source}
        return [arg for key, value in pairs.items() for arg in ("--build-arg", f"{key}={value}")]


def build_args() -> BuildArgs:
    return BuildArgs(project_version(), git_revision(), git_source(), base_ref())


def image_fingerprint() -> str:
    """Key of the project image: build context, Dockerfile, base and build arguments."""
    args = build_args()
    parts: list[str | bytes] = [args.version, args.revision, args.source, args.base]
    for f in [*(ROOT / n for n in _BUILD_FILES), *context_files()]:
        parts += [str(f.relative_to(ROOT)), f.read_bytes()]
    return _short_hash(*parts)


@dataclass(frozen=True)
class ProjectImage:
    """The built project image (``ensure("image")`` writes it, ``load_image`` reads it back)."""

    name: str  #: ``csr-service:<version>``, the chart's default image
    ref: str  #: ``localhost/csr-service:<version>-src<hash>``, this exact build
    id: str
    version: str
    revision: str
    source: str
    base: str


def load_image(record: Path) -> ProjectImage:
    """The ``ProjectImage`` of an ``image.json`` written by the ``image`` component."""
    return ProjectImage(**json.loads(record.read_text()))


def image_ok(artifact: Path) -> bool:
    """Whether the cached image record still names an image in the test bed's storage."""
    return _image_present(artifact)


def build_image(stage: Path, log: Path) -> None:
    """``podman build`` of the project's Dockerfile on the local base; record the result."""
    from tests.testbed.install import ensure

    ensure("python-base")
    args = build_args()
    fingerprint = image_fingerprint()
    name = f"{IMAGE_REPOSITORY}:{args.version}"
    ref = f"localhost/{IMAGE_REPOSITORY}:{args.version}-src{fingerprint}"
    cmd = ["podman", "build", "--network", "host", "--pull=never", *args.as_flags()]
    cmd += ["--tag", ref, "--tag", f"localhost/{name}", "--file", str(ROOT / "Dockerfile"), str(ROOT)]
    _run_logged(cmd, log, podman_env())
    # The cache key was computed before the build (it names the stage): a tree edited or
    # committed meanwhile would file this image under the wrong key, and a later checkout of the
    # earlier tree would get it. Refuse instead; the next run builds what is there then.
    if f"-src{fingerprint}-" not in stage.name or image_fingerprint() != fingerprint:
        raise InstallError("the source tree changed while the image was being built: run again")
    image_id = podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
    record = ProjectImage(name, ref, image_id, args.version, args.revision, args.source, args.base)
    (stage / "image.json").write_text(json.dumps(record.__dict__, indent=2) + "\n")
    _forget_old_images(keep=ref)


def _forget_old_images(keep: str) -> None:
    """Remove source-tagged project images beyond the newest few that are over an hour old.

    Each source hash leaves an image behind; without this the storage grows with every edit.
    An image some container still uses is not removed (podman refuses; that is fine), and the
    hour keeps a concurrent test run's fresh image safe.
    """
    proc = podman("images", "--format", "json", f"localhost/{IMAGE_REPOSITORY}", check=False)
    if proc.returncode != 0:
        return
    mine = []
    for img in json.loads(proc.stdout or "[]"):
        for tag in img.get("Names") or []:
            if "-src" in tag.rsplit(":", 1)[-1] and tag != keep:
                mine.append((int(img.get("Created", 0)), tag))
    mine.sort(reverse=True)
    now = time.time()
    old = [tag for created, tag in mine[_KEEP_IMAGES:] if now - created > _KEEP_SECONDS]
    for tag in old:
        podman("rmi", tag, check=False)
    # Build-stage layers nobody names any more (the layer cache of long-gone sources).
    podman("image", "prune", "--force", "--filter", "until=72h", check=False)


# ------------------------------------------------------------------ running containers (tests)
@dataclass
class Container:
    """A container the tests started (``run_container``); removed when its ``with`` block ends."""

    name: str

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman exec`` (as the image's user) and its result."""
        return podman("exec", self.name, *cmd, check=check, timeout=120)

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False, timeout=60)
        return proc.stdout + proc.stderr

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(podman("container", "inspect", self.name).stdout)[0])

    def running(self) -> bool:
        return bool(self.inspect()["State"]["Running"])

    def stop(self, grace_seconds: int) -> int:
        """What the kubelet does: SIGTERM, SIGKILL after ``grace_seconds``; the exit code."""
        podman("stop", "--time", str(grace_seconds), self.name, timeout=grace_seconds + 120)
        return int(self.inspect()["State"]["ExitCode"])


def unique_container_name(prefix: str) -> str:
    """A container name no other test run on the machine uses (they share the storage)."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def _reap_orphans(prefix: str) -> None:
    """Remove containers of test runs that died without cleaning up (killed pytest).

    A detached container outlives its test process (conmon, not pytest, is its parent), so the
    pid in the name tells whether its owner is still there.
    """
    proc = podman("ps", "--all", "--format", "{{.Names}}", "--filter", f"name=^{prefix}-", check=False)
    for name in proc.stdout.split():
        pid = name.removeprefix(f"{prefix}-").split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            podman("rm", "--force", "--time", "0", name, check=False)
        except PermissionError:
            pass  # alive, someone else's


@contextlib.contextmanager
def run_container(image: str, *args: str, options: Sequence[str] = (), prefix: str = "csr-test") -> Iterator[Container]:
    """``podman run -d`` on the host network; the container is force-removed afterwards."""
    _reap_orphans(prefix)
    container = Container(unique_container_name(prefix))
    podman("run", "--detach", "--name", container.name, "--network", "host", *options, image, *args)
    try:
        yield container
    finally:
        podman("rm", "--force", "--time", "0", container.name, check=False)


def image_files(image: str) -> list[str]:
    """Every path in ``image``'s filesystem (``podman export`` of a container never started)."""
    name = unique_container_name("csr-files")
    podman("create", "--name", name, image)
    try:
        exe = shutil.which("podman") or "podman"
        with subprocess.Popen([exe, "export", name], stdout=subprocess.PIPE, env=podman_env()) as proc:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                names = [member.name for member in tar]
        if proc.returncode != 0:
            raise InstallError(f"podman export {name} failed (exit {proc.returncode})")
        return names
    finally:
        podman("rm", "--force", name, check=False)


def _build() -> int:
    from tests.testbed.install import ensure

    try:
        image = load_image(ensure("image"))
    except InstallError as exc:
        print(f"[testbed] FAILED:\n{exc}", file=sys.stderr)
        return 1
    size = podman("image", "inspect", "--format", "{{.Size}}", image.ref).stdout.strip()
    print(f"built {image.name} = {image.ref}\n  revision {image.revision}, {int(size) / 1e6:.0f} MB, base {image.base}")
    cli = "python -m tests.testbed.containers podman"
    print("in the test bed's podman storage; run it with")
    print(f"  {cli} run --rm --network host {image.name} --dev --state-dir /tmp/dev")
    print(f"or save it for another engine:  {cli} save -o csr-service.tar {image.name}")
    return 0


def _main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        return _build()
    if argv[:1] == ["env"]:
        env = podman_env()
        for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF"):
            print(f"export {key}={env[key]}")
        return 0
    if argv[:1] == ["podman"]:
        exe = shutil.which("podman")
        if exe is None:
            print("podman is not installed: python -m tests.testbed.install container-tools", file=sys.stderr)
            return 1
        os.execve(exe, [exe, *argv[1:]], podman_env())
    print(__doc__.strip().splitlines()[0], file=sys.stderr)
    print("usage: python -m tests.testbed.containers build | env | podman ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
