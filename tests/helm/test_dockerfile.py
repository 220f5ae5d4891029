"""The Dockerfile: hadolint, the properties we promise, and its install step run outside Docker.

The image itself is built and run by ``tests/image`` (marker ``image``, root only). These run
anywhere: what decides whether it works, the wheels `pip wheel` makes (the build stage, which
compiles csr-service's one C extension) install offline, without compiling anything, into a
fresh environment (the final stage), and the installed `csr-service` starts, serves its probes
and decodes headers with the extension.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm.tools import ensure_tool
from tests.support.dev_server import free_port, http_get
from tests.support.waiting import wait_for

pytestmark = pytest.mark.helm

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions():
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def test_hadolint() -> None:
    proc = subprocess.run(
        [str(ensure_tool("hadolint")), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promised_properties() -> None:
    stages = _stages()
    assert len(stages) >= 2, "multi-stage"
    args = dict(a.split("=", 1) for w, a in _instructions() if w == "ARG" and "=" in a)
    assert "-slim" in args["PYTHON_IMAGE"]
    build, final = stages[0], stages[-1]
    assert any(w == "RUN" and "pip wheel" in a for w, a in build), "wheels built with pip wheel"
    final_text = "\n".join(f"{w} {a}" for w, a in final)
    # No compilers or package installs in the final image; offline install of the built wheels only.
    for forbidden in ("apt-get install", "gcc", "build-essential", "apk add", "pip wheel"):
        assert forbidden not in final_text, forbidden
    assert "--no-index" in final_text
    [user] = [a for w, a in final if w == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric user: runAsNonRoot can check it"
    assert int(uid) != 0, "non-root user"
    [entrypoint] = [a for w, a in final if w == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["csr-service", "serve"]
    labels = " ".join(a for w, a in final if w == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    ignored = (ROOT / ".dockerignore").read_text()
    assert ignored.splitlines()[1] == "*", "context is allow-listed"
    # Every top-level package of the distribution (the core and the built-in issuer plugins)
    # reaches the build stage; a missing one would leave its entry points dangling in the image.
    copied = {a.split()[0] for w, a in build if w == "COPY"}
    for package in ("csr_service", "issuers"):
        assert package in copied, f"COPY {package} missing from the build stage"
        assert f"!{package}/" in ignored.splitlines(), f"{package}/ is not allow-listed in .dockerignore"


def test_install_step_outside_docker(tmp_path: Path) -> None:
    """The Dockerfile's RUN pip lines, verbatim in spirit: wheels, then offline install."""
    wheel_cmds = [a for w, a in _stages()[0] if w == "RUN" and "pip wheel" in a]
    # Dependencies (with the vault extra) in one layer, our own wheel without them in the next.
    assert any(".[vault]" in shlex.split(cmd) for cmd in wheel_cmds), wheel_cmds
    assert "--no-deps" in shlex.split(wheel_cmds[-1]), wheel_cmds
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Dependencies must come as wheels (--only-binary): nothing is compiled, so no build tools.
    subprocess.run(
        [*pip, "wheel", "--quiet", "--only-binary=:all:", "--wheel-dir", str(wheels), f"{ROOT}[vault]"],
        check=True,
        cwd=ROOT,
    )
    env_dir = tmp_path / "image-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            *pip,
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-index",
            "--only-binary=:all:",
            "--find-links",
            str(wheels),
            "csr-service[vault]==0.1.0",
        ],
        check=True,
    )
    cli = env_dir / "bin" / "csr-service"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "csr-service 0.1.0"
    help_text = subprocess.run([str(cli), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--http-listen" in help_text
    assert "--vault-address" in help_text

    # And it runs: dev mode from the installed wheel (not the source tree), probes on HTTP.
    http_port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(cli),
                "serve",
                "--dev",
                "--state-dir",
                str(tmp_path / "state"),
                f"--grpc-listen=127.0.0.1:{free_port()}",
                f"--http-listen=127.0.0.1:{http_port}",
                "--workers=1",
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"csr-service exited with {proc.returncode}:\n{log.read_text()}"
            return http_get(http_port, "/readyz")[0] == 200

        try:
            wait_for(ready, timeout=60, what="/readyz 200 from the installed wheel", ignoring=(OSError,))
        except TimeoutError as exc:
            raise AssertionError(log.read_text()) from exc
        assert "citadel_server_csr_count" in http_get(http_port, "/metrics")[1]
    finally:
        proc.terminate()
        proc.wait(15)
    import_check = (
        "import csr_service.transport.hpack_decoder as h; import csr_service.transport._hpack as c;"
        " print(h.__file__, c.__file__, h.ACCELERATED)"
    )
    where = subprocess.run([str(python), "-c", import_check], capture_output=True, text=True, check=True, cwd=tmp_path)
    module, extension, accelerated = where.stdout.split()
    assert module.startswith(str(env_dir)), "the installed wheel, not the source tree"
    # The wheel carries the C extension (the build stage has a compiler), and it is the one used.
    assert extension.startswith(str(env_dir)), extension
    assert extension.endswith(".so"), extension
    assert accelerated == "True"
