"""Configuration: flag > env > file > default, typed, validated, errors name the flag."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from csr_service.cli import build_config, make_parser
from csr_service.common.errors import ConfigError
from csr_service.config import Config, all_options, resolve


def test_defaults_match_istio_csr() -> None:
    c = Config.from_values(resolve({}, env={}))
    assert c.pipeline.max_certificate_duration == timedelta(hours=1)
    assert c.pipeline.cluster_id == "Kubernetes"
    assert c.pipeline.trust_domain == "cluster.local"
    assert c.authenticator is not None
    assert c.authenticator.name == "jwt"
    assert c.authenticator.values["token-audiences"] == ("istio-ca",)
    assert c.server.insecure_grpc_listen is None  # TLS only by default
    assert c.server.grpc_transport == "native"  # auto: the native transport without the mTLS listener
    assert (
        Config.from_values(resolve({}, env={"CSR_SERVICE_GRPC_TRANSPORT": "grpcio"})).server.grpc_transport == "grpcio"
    )


def test_auto_transport_is_grpcio_with_the_client_certificate_listener() -> None:
    flags = {"authenticators": "client-cert,tokenreview", "client-cert-grpc-listen": "0.0.0.0:6444"}
    assert Config.from_values(resolve(flags, env={})).server.grpc_transport == "grpcio"
    assert Config.from_values(resolve({**flags, "grpc-transport": "grpcio"}, env={})).server.grpc_transport == "grpcio"


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('cluster-id = "from-file"\ntrust-domain = "file.td"\nmax-certificate-duration = "2h"\n')
    env = {
        "CSR_SERVICE_CONFIG": str(cfg),
        "CSR_SERVICE_TRUST_DOMAIN": "env.td",
        "CSR_SERVICE_CLUSTER_ID": "env",
    }
    v = resolve({"cluster-id": "flag"}, env=env)
    assert v["cluster-id"] == "flag"
    assert v["trust-domain"] == "env.td"
    assert v["max-certificate-duration"] == timedelta(hours=2)


def test_file_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('clusterid = "typo"\n')
    with pytest.raises(ConfigError, match=r"unknown setting.*clusterid"):
        resolve({"config": str(cfg)}, env={})


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"max-certificate-duration": "forever"}, "--max-certificate-duration"),
        ({"grpc-listen": "nope"}, "--grpc-listen"),
        ({"workers": "-1"}, "--workers"),
        ({"issuer": "nope"}, "--issuer"),
        ({"serving-key-type": "dsa"}, "--serving-key-type"),
        ({"serving-ip-addresses": "not-an-ip"}, "--serving-ip-addresses"),
        ({"log-format": "xml"}, "--log-format"),
        ({"dev": "maybe"}, "--dev"),
        ({"grpc-transport": "h2"}, "--grpc-transport"),
        (
            {
                "grpc-transport": "native",
                "authenticators": "client-cert,tokenreview",
                "client-cert-grpc-listen": "0.0.0.0:6444",
            },
            r"--client-cert-grpc-listen: needs --grpc-transport grpcio \(or auto\)",
        ),
    ],
)
def test_errors_name_the_flag(flags: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Config.from_values(resolve(flags, env={}))


def test_env_error_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="CSR_SERVICE_WORKERS"):
        resolve({}, env={"CSR_SERVICE_WORKERS": "many"})


def test_dev_mode_defaults_and_loopback_only(tmp_path: Path) -> None:
    c = build_config({"dev": "true", "state-dir": str(tmp_path / "s")})
    assert c.server.grpc_listen.startswith("127.0.0.1:")
    assert c.server.serving_dns_names == ("localhost",)
    assert c.issuer.values["local-ca-dir"].endswith("/s/ca")
    assert (tmp_path / "s" / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="loopback"):
        build_config({"dev": "true", "state-dir": str(tmp_path / "s"), "grpc-listen": "0.0.0.0:6443"})


def test_help_documents_every_option_with_default_and_env() -> None:
    parser = make_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help().replace("\n", " ")
    for opt in all_options():
        assert f"--{opt.name}" in text
        assert opt.env in text.replace(" ", "")
