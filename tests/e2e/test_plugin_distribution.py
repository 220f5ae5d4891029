"""A third party's plugins, shipped as their own distribution, work like the built-ins.

``tests/plugin_example`` is a separate project (its own ``pyproject.toml`` with entry points in
``csr_service.issuers`` and ``csr_service.authenticators``). It is built and installed with pip
into a directory of its own, never into csr-service's venv, and then:

- the registry finds both plugins, and ``serve --help`` lists their flags;
- the issuer, configured from flags, passes the issuer conformance suite;
- ``csr-service serve --issuer example --authenticator example-static`` issues a certificate
  that ``csr-service request`` verifies, and refuses an unknown token.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from csr_service.cli import build_config
from csr_service.common.errors import ConfigError
from csr_service.plugins import registry
from csr_service.plugins.registry import AUTHENTICATORS, ISSUERS, create_issuer
from csr_service.plugins.runtime import Runtime
from tests.conformance.issuer_suite import IssuerConformance, IssuerFactory
from tests.support.certs import uri_sans, write_ca_dir
from tests.support.dev_server import CSR_SERVICE, free_port, running_server
from tests.support.pki import load_certs

pytestmark = pytest.mark.e2e

SOURCE = Path(__file__).resolve().parents[1] / "plugin_example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example distribution installed into a directory of its own (put on sys.path)."""
    work = tmp_path_factory.mktemp("plugin")
    src = work / "src"
    shutil.copytree(SOURCE, src)
    site = work / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [*pip, "--target", str(site), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert list(site.glob("csr_service_example-*.dist-info")), "pip did not install the distribution's metadata"
    sys.path.insert(0, str(site))
    registry.plugins.cache_clear()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        registry.plugins.cache_clear()
        for name in [m for m in sys.modules if m.startswith("csr_service_example")]:
            del sys.modules[name]


def test_the_registry_finds_installed_plugins_beside_the_built_ins(plugin_site: Path) -> None:
    assert set(registry.plugins(ISSUERS)) == {"local", "vault", "cert-manager", "example"}
    assert set(registry.plugins(AUTHENTICATORS)) == {"jwt", "tokenreview", "jwks", "client-cert", "example-static"}


def test_without_the_distribution_the_plugin_is_unknown() -> None:
    # A fresh process without the plugin's directory on its path (this one may have it).
    res = subprocess.run([*CSR_SERVICE, "serve", "--issuer", "example"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--issuer: unknown issuer 'example'; choose one of cert-manager, local, vault" in res.stderr


def test_plugin_options_are_flags_with_validation(plugin_site: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([*CSR_SERVICE, "serve", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--example-ca-dir" in out.stdout
    assert "--example-tokens-file" in out.stdout
    assert "CSR_SERVICE_EXAMPLE_MAX_TTL" in out.stdout
    # The plugin's own validator runs at start-up and names its flag.
    with pytest.raises(ConfigError, match="--example-max-ttl: must be at least 10m"):
        build_config({"issuer": "example", "example-ca-dir": str(tmp_path), "example-max-ttl": "1m"})


class TestExampleIssuerConformance(IssuerConformance):
    """The out-of-tree issuer, built exactly as ``serve`` builds it from flags."""

    @pytest.fixture
    def ca(self, tmp_path: Path) -> tuple[Path, x509.Certificate]:
        _, _, root = write_ca_dir(tmp_path / "ca")
        return tmp_path / "ca", root

    @pytest.fixture
    def issuer_factory(self, plugin_site: Path, ca: tuple[Path, x509.Certificate]) -> IssuerFactory:
        config = build_config({"issuer": "example", "example-ca-dir": str(ca[0]), "example-max-ttl": "2h"})
        assert config.issuer.name == "example"
        assert config.issuer.values["example-max-ttl"] == timedelta(hours=2)
        return lambda: create_issuer(config.issuer.name, config.issuer.values, config.runtime())

    @pytest.fixture
    def trust_roots(self, ca: tuple[Path, x509.Certificate]) -> Sequence[x509.Certificate]:
        return [ca[1]]

    @pytest.fixture
    def unusable_issuer_factory(self, plugin_site: Path, tmp_path: Path) -> IssuerFactory:
        values = {"example-ca-dir": str(tmp_path / "missing"), "example-max-ttl": timedelta(hours=1)}
        return lambda: create_issuer("example", values, Runtime())


def test_serve_and_request_with_out_of_tree_plugins(plugin_site: Path, tmp_path: Path) -> None:
    _, _, root = write_ca_dir(tmp_path / "ca")
    (tmp_path / "tokens").write_text("s3cret-token default sleep\n")
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    args = ["--issuer", "example", "--example-ca-dir", str(tmp_path / "ca")]
    args += ["--authenticator", "example-static", "--example-tokens-file", str(tmp_path / "tokens")]
    args += ["--grpc-listen", f"127.0.0.1:{port}", "--workers", "1", "--serving-dns-names", "localhost"]
    args += ["--serving-ip-addresses", "127.0.0.1"]
    root_file = tmp_path / "ca" / "root-cert.pem"
    with running_server(
        args, root_cert=root_file, state_dir=tmp_path, log_path=tmp_path / "server.log", port=port, env=env
    ) as srv:
        for token, ok in (("s3cret-token", True), ("wrong", False)):
            (tmp_path / "token").write_text(token)
            out = tmp_path / f"out-{ok}"
            request = ["request", "--ca-address", srv.address, "--root-cert", str(root_file)]
            request += ["--token-file", str(tmp_path / "token"), "--trust-domain", "cluster.local"]
            request += ["--namespace", "default", "--service-account", "sleep", "--out-dir", str(out)]
            res = subprocess.run(
                [*CSR_SERVICE, *request],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, **env},
            )
            if ok:
                assert res.returncode == 0, res.stderr
                chain = load_certs((out / "cert-chain.pem").read_bytes())
                assert uri_sans(chain[0]) == ["spiffe://cluster.local/ns/default/sa/sleep"]
                assert load_certs((out / "root-cert.pem").read_bytes()) == [root]
            else:
                assert res.returncode != 0
                assert "UNAUTHENTICATED" in res.stderr
