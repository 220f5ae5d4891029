"""pytest fixtures for the real test bed. Registered by ``tests/conftest.py`` (``pytest_plugins``).

Fixtures and the marker each test using them must carry:

=====================  ==============  =====================================================
fixture                marker          what
=====================  ==============  =====================================================
``kube``               ``kube``        etcd + kube-apiserver (session); ``KubeCluster``
``own_kube``           ``kube``        a private etcd + kube-apiserver per module, free to restart
``remote_kube``        ``multicluster`` a second private etcd + kube-apiserver per module (a remote cluster)
``openbao``            ``vault``       OpenBao dev server with PKI + approle (session); ``OpenBao``
``openbao_kube_auth``  ``vault, kube`` kubernetes auth on ``openbao`` against ``kube``
``cert_manager``       ``certmanager`` CRDs + controllers + Ready CA issuers (session)
``cert_manager_no_approver``  ``certmanager``  same, approver stopped for the test
``istio_client``       ``istio``       the Istio conformance client; ``IstioClient``
``ghz``                ``e2e``         ghz (a load generator on Go's gRPC client, as istio-agent's); its path
``istiod``             ``istiod``      Istio's real istiod with its built-in CA on ``kube`` (module)
``container_image``    ``image``       the project's image, built by podman (session); ``ProjectImage``
=====================  ==============  =====================================================

Tests that need istiod in another mode (``EXTERNAL_CA``, ``PILOT_CERT_PROVIDER``) start their own
with ``tests.testbed.istiod.start_istiod`` and carry the ``istiod`` marker, which also builds
``pilot-agent``.

Components are built lazily (``tests.testbed.install.ensure``): before the first test runs, the
collection hook in ``tests/conftest.py`` builds just what the selected tests need, outside any
per-test timeout. A missing component fails the tests that need it with a message naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.testbed import install
from tests.testbed.certmanager import CertManager, start_cert_manager
from tests.testbed.containers import ProjectImage, load_image
from tests.testbed.istio import IstioClient
from tests.testbed.istiod import Istiod, start_istiod
from tests.testbed.kube import KubeCluster, start_kube
from tests.testbed.openbao import OpenBao, OpenBaoKubeAuth, configure_kube_auth, start_openbao
from tests.testbed.process import PeerStartupError

T = TypeVar("T")

#: fixture name -> (components it needs, marker its tests must carry)
FIXTURE_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "kube": (("etcd", "kube-apiserver"), "kube"),
    "own_kube": (("etcd", "kube-apiserver"), "kube"),
    "remote_kube": (("etcd", "kube-apiserver"), "multicluster"),
    "openbao": (("openbao",), "vault"),
    "openbao_kube_auth": (("openbao", "etcd", "kube-apiserver"), "kube"),
    "cert_manager": (
        ("etcd", "kube-apiserver", "cert-manager-crds", "cert-manager-controller"),
        "certmanager",
    ),
    "cert_manager_no_approver": (
        ("etcd", "kube-apiserver", "cert-manager-crds", "cert-manager-controller"),
        "certmanager",
    ),
    "istio_client": (("istio-client",), "istio"),
    "ghz": (("ghz",), "e2e"),
    "istiod": (("etcd", "kube-apiserver", "pilot-discovery"), "istiod"),
    "container_image": (("image",), "image"),
}


def _start(start: Callable[[Path], T], factory: pytest.TempPathFactory, name: str, attempts: int = 3) -> T:
    """Start a peer in a fresh tmp dir; retry when a port picked as free was taken meanwhile."""
    for attempt in range(1, attempts + 1):
        try:
            return start(factory.mktemp(name))
        except PeerStartupError as exc:
            if attempt == attempts or "address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """etcd + kube-apiserver on 127.0.0.1 for the whole session (see ``KubeCluster``)."""
    cluster = _start(start_kube, tmp_path_factory, "kube")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def own_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A private etcd + kube-apiserver for one module: its tests may stop, restart or reconfigure
    the apiserver (``restart_apiserver``, ``stop_apiserver``/``start_apiserver``) without
    disturbing the shared ``kube`` other tests and session peers use."""
    cluster = _start(start_kube, tmp_path_factory, "own-kube")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def remote_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A second private etcd + kube-apiserver for one module, next to ``own_kube`` or ``kube``: a
    remote cluster of a multi-cluster mesh. ``start_kube`` gives it its own ports, etcd (data
    dir, client and peer ports), certificates, service-account signing key and directory, so
    tokens of one cluster mean nothing to the other; it may be stopped and restarted freely."""
    cluster = _start(start_kube, tmp_path_factory, "remote-kube")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """An OpenBao dev server with PKI mounts ``pki`` and ``pki_int``, role ``spiffe``, approle."""
    bao = _start(start_openbao, tmp_path_factory, "openbao")
    try:
        yield bao
    finally:
        bao.stop()


@pytest.fixture(scope="session")
def openbao_kube_auth(openbao: OpenBao, kube: KubeCluster) -> OpenBaoKubeAuth:
    """Kubernetes auth (mount ``kubernetes``, role ``csr-service``) on ``openbao`` against ``kube``."""
    return configure_kube_auth(openbao, kube)


@pytest.fixture(scope="session")
def cert_manager(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertManager]:
    """cert-manager's controllers with Ready CA Issuer ``istio-system/testbed-ca`` and
    ClusterIssuer ``testbed-cluster-ca`` (see ``CertManager``)."""
    cm = start_cert_manager(kube, tmp_path_factory.mktemp("cert-manager"))
    try:
        yield cm
    finally:
        cm.stop()


@pytest.fixture
def cert_manager_no_approver(cert_manager: CertManager) -> Iterator[CertManager]:
    """``cert_manager`` with the built-in approver stopped for this test (restarted afterwards)."""
    with cert_manager.without_approver() as cm:
        yield cm


@pytest.fixture(scope="session")
def istio_client() -> IstioClient:
    """The Istio conformance client: call it to run one CreateCertificate like a sidecar."""
    return IstioClient()


@pytest.fixture(scope="session")
def ghz() -> Path:
    """ghz: many calls at once through Go's gRPC client, the one istio-agent uses."""
    return install.ensure("ghz")


@pytest.fixture(scope="module")
def istiod(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Istiod]:
    """Istio's istiod (``pilot-discovery``) with its built-in CA on ``kube``: a reference Istio CA
    server on ``istiod.ca_address`` (verify the name ``tests.testbed.istiod.ISTIOD_SAN``).

    Per module, not per session: while it runs, istiod writes its own ``istio-ca-root-cert`` into
    every namespace of the shared ``kube``, which tests of csr-service's own root publisher must
    not see."""
    server = _start(lambda d: start_istiod(kube, d), tmp_path_factory, "istiod")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def container_image() -> ProjectImage:
    """The project's image built from this source tree (``tests/testbed/containers.py``).

    Where it cannot be built (not root, no apt) every test using it fails with the reason: an
    image nobody could build is not an image that passed.
    """
    try:
        return load_image(install.ensure("image"))
    except install.InstallError as exc:
        reason = str(exc)
    pytest.fail(f"the container image could not be built, so it was not tested: {reason}", pytrace=False)


# ------------------------------------------------------------------ collection hooks
#: A marker that implies others: cert-manager tests need kube, but `-m kube` should not run them.
IMPLIED_MARKERS = {"certmanager": {"kube"}, "istiod": {"kube"}, "multicluster": {"kube"}}
#: What a peer marker brings. A test body run against a fake and the real peer gets the peer
#: from a parametrized fixture calling ``request.getfixturevalue`` for the real half only,
#: which the fixture scan cannot see; its marker (on that half alone) still says what to build.
MARKER_NEEDS: dict[str, tuple[str, ...]] = {
    "kube": FIXTURE_NEEDS["kube"][0],
    "multicluster": FIXTURE_NEEDS["remote_kube"][0],
    "vault": FIXTURE_NEEDS["openbao"][0],
    "certmanager": FIXTURE_NEEDS["cert_manager"][0],
    "istio": FIXTURE_NEEDS["istio_client"][0],
    "istiod": (*FIXTURE_NEEDS["istiod"][0], "pilot-agent"),
    "image": FIXTURE_NEEDS["container_image"][0],
}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse tests that use a peer fixture without carrying the peer's marker."""
    bad = []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        markers = {m.name for m in item.iter_markers()}
        implied = set().union(*(IMPLIED_MARKERS.get(m, set()) for m in markers))
        for fx, (_, marker) in FIXTURE_NEEDS.items():
            if fx in fixtures and marker not in markers | implied:
                bad.append(f"{item.nodeid}: uses fixture {fx!r} but is not marked @pytest.mark.{marker}")
    if bad:
        raise pytest.UsageError("test-bed marker check failed:\n  " + "\n  ".join(bad))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build (or find cached) every component the selected tests need, before any test runs."""
    if session.config.option.collectonly or not session.items:
        return
    needed: set[str] = set()
    for item in session.items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fx, (components, _) in FIXTURE_NEEDS.items():
            if fx in fixtures:
                needed.update(components)
        for marker in item.iter_markers():
            needed.update(MARKER_NEEDS.get(marker.name, ()))
    if not needed:
        return
    # ensure() remembers each failure; the fixtures that need the component re-raise it, so only
    # the tests depending on the missing piece fail, each with the message naming it.
    with contextlib.suppress(install.InstallError):
        install.ensure_many(needed)
