"""The container image, built from the project's Dockerfile by the test bed and run with podman.

The image is built on a local stand-in for the official Python base (``tests/testbed/containers.py``)
and run the way the Helm chart runs it: the chart's securityContext is rendered and turned into
podman flags, so a chart change is tested against the image too. Host networking: dev mode
listens on loopback only, and the ports are free ports of this test run.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.dynamic import DynamicClient

from tests.helm.chart import CHART, one, render
from tests.support.dev_server import CSR_SERVICE, free_port, http_get
from tests.support.pki import load_certs, spiffe_uris, verify_chain
from tests.support.waiting import wait_for
from tests.testbed.containers import (
    IMAGE_REPOSITORY,
    Container,
    ProjectImage,
    git_source,
    image_files,
    podman,
    run_container,
)
from tests.testbed.kube import KubeCluster, unique_name

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
STATE = "/tmp/dev-state"  # on the tmpfs: the root filesystem is read-only
IDENTITY = "spiffe://cluster.local/ns/default/sa/sleep"


def _deployment() -> dict[str, Any]:
    return one(render({}), "Deployment")


def _chart_security_flags() -> list[str]:
    """podman flags for what the chart's default pod and container securityContext ask."""
    pod = _deployment()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ctx = {**pod.get("securityContext", {}), **container["securityContext"]}
    flags = [f"--user={ctx['runAsUser']}:{ctx['runAsGroup']}"]
    if ctx.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if ctx.get("allowPrivilegeEscalation") is False:
        flags.append("--security-opt=no-new-privileges")
    flags += [f"--cap-drop={cap}" for cap in ctx.get("capabilities", {}).get("drop", [])]
    flags += [f"--cap-add={cap}" for cap in ctx.get("capabilities", {}).get("add", [])]
    # The chart's emptyDir mounts become tmpfs mounts, writable by the pod's fsGroup.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for mount in container["volumeMounts"]:
        if mount["name"] in empty_dirs:
            flags.append(f"--tmpfs={mount['mountPath']}:rw,size=64m,mode=1777")
    assert "--read-only" in flags, "the chart asks for a read-only root filesystem"
    assert "--cap-drop=ALL" in flags, "the chart drops all capabilities"
    return flags


class DevContainer:
    """``serve --dev`` in the image, started with the chart's security flags."""

    def __init__(self, container: Container, image_ref: str, grpc_port: int, http_port: int) -> None:
        self.container = container
        self.image_ref = image_ref
        self.grpc_port = grpc_port
        self.http_port = http_port

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.container.running(), f"the container exited:\n{self.container.logs()}"
            return http_get(self.http_port, "/readyz")[0] == 200

        try:
            wait_for(ready, timeout=120, what="/readyz 200 from the container", ignoring=(OSError,))
        except TimeoutError as exc:
            raise AssertionError(self.container.logs()) from exc


@contextlib.contextmanager
def _dev_container(image: ProjectImage, *extra: str) -> Iterator[DevContainer]:
    grpc_port, http_port = free_port(), free_port()
    args = ["--dev", f"--state-dir={STATE}", f"--grpc-listen=127.0.0.1:{grpc_port}"]
    args += [f"--http-listen=127.0.0.1:{http_port}", "--workers=2", *extra]
    with run_container(image.ref, *args, options=_chart_security_flags(), prefix="csr-image-test") as container:
        dev = DevContainer(container, image.ref, grpc_port, http_port)
        dev.wait_ready()
        yield dev


@pytest.fixture(scope="module")
def dev(container_image: ProjectImage) -> Iterator[DevContainer]:
    with _dev_container(container_image) as running:
        yield running


def test_probes_answer_from_the_container(dev: DevContainer) -> None:
    status, body = http_get(dev.http_port, "/readyz")
    assert status == 200, body
    assert "worker-1/issuer ok" in body, "both workers of the supervisor started"
    assert http_get(dev.http_port, "/livez")[0] == 200
    status, metrics = http_get(dev.http_port, "/metrics")
    assert status == 200
    # Worker metrics go through files in the tmpfs /tmp (prometheus multiprocess mode).
    assert "citadel_server_csr_count" in metrics


def test_request_from_the_host_gets_a_certificate_that_verifies(dev: DevContainer, tmp_path: Path) -> None:
    root_pem = dev.container.exec("cat", f"{STATE}/root-cert.pem").stdout
    token = dev.container.exec(
        "csr-service", "dev-token", f"--state-dir={STATE}", "--namespace=default", "--service-account=sleep"
    ).stdout.strip()
    (tmp_path / "root-cert.pem").write_text(root_pem)
    (tmp_path / "token").write_text(token)
    out = tmp_path / "certs"
    args = [*CSR_SERVICE, "request", f"--ca-address=127.0.0.1:{dev.grpc_port}"]
    args += [f"--root-cert={tmp_path / 'root-cert.pem'}", f"--token-file={tmp_path / 'token'}"]
    args += ["--trust-domain=cluster.local", "--namespace=default", "--service-account=sleep", f"--out-dir={out}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    chain = load_certs((out / "cert-chain.pem").read_bytes())
    roots = load_certs(root_pem)
    assert spiffe_uris(chain[0]) == [IDENTITY]
    assert verify_chain(chain[0], chain[1:], roots)[-1] == roots[0]


def test_runs_as_the_charts_security_context_asks(dev: DevContainer) -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    uid = pod["securityContext"]["runAsUser"]
    status = dev.container.exec("cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(uid)] * 4, "every uid of the server is the chart's non-root uid"
    assert uid != 0
    # The image's own USER is the same numeric uid:gid: runAsNonRoot alone (no runAsUser) can
    # check it, and a plain `docker run` is not root either.
    image_user = podman("image", "inspect", "--format={{.Config.User}}", dev.image_ref).stdout.strip()
    assert image_user == f"{uid}:{pod['securityContext']['runAsGroup']}"
    for cap in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, f"{cap}: all capabilities dropped"
    assert fields["NoNewPrivs"].strip() == "1"
    assert dev.container.inspect()["HostConfig"]["ReadonlyRootfs"] is True
    # The root filesystem refuses writes; the tmpfs where the state goes takes them.
    write = 'import sys; open(sys.argv[1], "w").write("x")'
    refused = dev.container.exec("python", "-c", write, "/usr/local/csr-write-test", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr
    assert dev.container.exec("python", "-c", write, "/tmp/csr-write-test", check=False).returncode == 0


def test_the_c_hpack_decoder_was_built_and_is_used(dev: DevContainer) -> None:
    """The build stage compiled the extension into the wheel (the final stage has no compiler)."""
    check = "import csr_service.transport.hpack_decoder as h; print(h.ACCELERATED, h.HeaderDecoder.__module__)"
    assert dev.container.exec("python", "-c", check).stdout.split() == ["True", "csr_service.transport._hpack"]


def test_final_image_has_no_compiler_pip_cache_or_test_code(container_image: ProjectImage) -> None:
    files = image_files(container_image.ref)
    site = "usr/local/lib/python3.11/site-packages/"
    # It is the image we think it is: the application and its entry point are in it.
    assert f"{site}csr_service/cli.py" in files
    assert f"{site}issuers/vault/__init__.py" in files
    assert "usr/local/bin/csr-service" in files
    compilers = re.compile(r"(^|/)(s?bin)/([\w.-]*-)?(gcc|g\+\+|cc|c\+\+|clang|ld|as)(-[\d.]+)?$|/cc1$")
    assert [f for f in files if compilers.search(f)] == []
    # Wheels only where the base keeps ensurepip's own (the official image has them too).
    bootstrap = ("usr/share/python-wheels/", "usr/local/lib/python3.11/ensurepip/_bundled/")
    assert [f for f in files if "/.cache/pip" in f or (f.endswith(".whl") and not f.startswith(bootstrap))] == []
    assert not any(f.startswith((f"{site}pip/", "usr/local/bin/pip")) for f in files), "pip was removed"
    assert not any(f.startswith(("tmp/wheels", "src/")) for f in files), "build-stage leftovers"
    ours = ("tests/", "conftest.py", "bench/", "scripts/")
    assert [f for f in files if f.startswith(tuple(site + o for o in ours)) or f.startswith(ours)] == []
    record = next(f for f in files if re.fullmatch(rf"{site}csr_service-[^/]+\.dist-info/RECORD", f))
    listed = podman("run", "--rm", "--entrypoint=cat", container_image.ref, f"/{record}").stdout
    # Our distribution installs its two packages and its script, and nothing else (no tests).
    entries = [line.split(",", 1)[0] for line in listed.splitlines() if line]
    assert {e.split("/", 1)[0] for e in entries} == {"csr_service", "issuers", record.split("/")[-2], ".."}
    assert [e for e in entries if e.startswith("..")] == ["../../../bin/csr-service"]


def test_sigterm_drains_and_exits_0_within_the_grace_period(container_image: ProjectImage) -> None:
    grace = int(_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    with _dev_container(container_image) as dev:
        # podman stop is what the kubelet does: SIGTERM, then SIGKILL (exit 137) after the grace period.
        exit_code = dev.container.stop(grace)
        logs = dev.container.logs()
        assert exit_code == 0, logs
        assert "shutting down: draining in-flight requests" in logs
        assert "Traceback" not in logs


def test_version_and_labels_name_the_commit(container_image: ProjectImage) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    commit = head.stdout.strip()
    # `docker run IMAGE --version`: the entrypoint is `csr-service serve`.
    out = podman("run", "--rm", "--network=host", container_image.ref, "--version").stdout.strip()
    match = re.fullmatch(r"csr-service (\S+) \(revision ([0-9a-f]{40})(-dirty)?\)", out)
    assert match, out
    assert match.group(1) == container_image.version
    assert match.group(2) == commit
    labels = json.loads(podman("image", "inspect", "--format={{json .Labels}}", container_image.ref).stdout)
    assert labels["org.opencontainers.image.revision"] == commit + (match.group(3) or "")
    assert labels["org.opencontainers.image.version"] == container_image.version
    assert labels["org.opencontainers.image.source"] == git_source()
    chart = (CHART / "Chart.yaml").read_text()
    assert f'appVersion: "{container_image.version}"' in chart, "the chart's appVersion is the image's version"


def test_charts_default_image_is_the_built_image(container_image: ProjectImage) -> None:
    [container] = _deployment()["spec"]["template"]["spec"]["containers"]
    assert container["image"] == container_image.name == f"{IMAGE_REPOSITORY}:{container_image.version}"
    # The build tagged that name (another test run on the machine may have tagged a newer
    # build of its own tree since; its version label is the same).
    named = f"localhost/{container_image.name}"
    labels = json.loads(podman("image", "inspect", "--format={{json .Labels}}", named).stdout)
    assert labels["org.opencontainers.image.version"] == container_image.version


@pytest.mark.kube
def test_chart_with_the_built_image_passes_a_server_side_dry_run(
    container_image: ProjectImage, kube: KubeCluster
) -> None:
    digest = podman("image", "inspect", "--format={{.Digest}}", container_image.ref).stdout.strip()
    assert digest.startswith("sha256:")
    dyn = DynamicClient(kube.api_client)
    if "istio-system" not in {n.metadata.name for n in kube.core.list_namespace().items}:
        kube.create_namespace("istio-system")  # the chart's default (cert-manager) issuer has a Role there
    for values in ({}, {"image": {"digest": digest}}):
        namespace = kube.create_namespace()
        manifests = render(values, namespace=namespace, release=unique_name("rel"))
        [container] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
        assert container["image"] in {container_image.name, f"{IMAGE_REPOSITORY}@{digest}"}
        for m in manifests:
            api = dyn.resources.get(api_version=m["apiVersion"], kind=m["kind"])
            try:
                api.create(body=m, namespace=m["metadata"].get("namespace"), query_params=[("dryRun", "All")])
            except k8s.ApiException as exc:
                raise AssertionError(f"{m['kind']} {m['metadata']['name']} rejected: {exc.body}") from exc
