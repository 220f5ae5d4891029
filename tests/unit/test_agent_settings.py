"""``csr-service agent`` flags: defaults, gen-istio-cert's aliases, and refusals that name the flag."""

from __future__ import annotations

import base64
import json
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from csr_service.agent.settings import AgentSettings
from csr_service.cli import make_parser
from csr_service.common.errors import ConfigError
from csr_service.pki.keys import KeyType


def _token(tmp: Path, ns: str = "gw", sa: str = "gateway") -> Path:
    claims = {
        "sub": f"system:serviceaccount:{ns}:{sa}",
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}},
    }
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    path = tmp / "token"
    path.write_text(f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln\n")
    return path


def _settings(tmp: Path, *args: str) -> AgentSettings:
    (tmp / "root.pem").write_text("roots")
    base = ["agent", "--token-file", str(_token(tmp)), "--root-cert", str(tmp / "root.pem")]
    return AgentSettings.from_args(make_parser().parse_args([*base, *args]))


def test_defaults_and_identity_from_the_token(tmp_path: Path) -> None:
    s = _settings(tmp_path, "--out-dir", str(tmp_path / "o"))
    assert s.ca_address == "istiod.istio-system.svc:15012"
    assert (s.namespace, s.service_account, s.trust_domain, s.cluster_id) == (
        "gw",
        "gateway",
        "cluster.local",
        "Kubernetes",
    )
    assert s.identity == "spiffe://cluster.local/ns/gw/sa/gateway"
    assert (s.key_type, s.ttl, s.renew_at, s.renew_jitter) == (KeyType.EC_P256, timedelta(hours=24), 0.5, 0.1)
    assert (s.check_interval, s.backoff_initial, s.backoff_max) == (10, 1, 60)
    assert s.signal is signal.SIGHUP
    assert s.secret is None
    assert not s.once


def test_gen_istio_cert_aliases(tmp_path: Path) -> None:
    s = _settings(
        tmp_path,
        *("--cluster-name", "east", "--sa-name", "gateway", "--sa-namespace", "gw"),
        *("--output-secret", "gw-cert", "--output-secret-ns", "edge", "--leader-election-id", "gw-lock"),
    )
    assert s.cluster_id == "east"
    assert s.secret is not None
    assert (s.secret.namespace, s.secret.name, s.secret.lease_name) == ("edge", "gw-cert", "gw-lock")
    default = _settings(tmp_path, "--output-secret", "gw-cert").secret
    assert default is not None
    assert (default.namespace, default.lease_name) == ("gw", "gateway.csr-service-agent")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--out-dir", "o", "--service-account", "other"], "--namespace/--service-account"),
        (["--out-dir", "o", "--sa-namespace", "other"], "--namespace/--service-account"),
        ([], "no output"),
        (["--out-dir", "o", "--renew-at", "1.5"], "--renew-at"),
        (["--out-dir", "o", "--renew-jitter", "x"], "--renew-jitter"),
        (["--out-dir", "o", "--backoff-initial", "10s", "--backoff-max", "1s"], "--backoff-max"),
        (["--out-dir", "o", "--ttl", "0s"], "--ttl"),
        (["--out-dir", "o", "--signal", "NOPE"], "--signal"),
        (["--out-dir", "o", "--ca-address", "no-port"], "--ca-address"),
        (["--output-secret", "Bad_Name"], "--output-secret"),
        (["--output-secret", "s", "--renew-deadline", "20s"], "leader election"),
    ],
)
def test_refusals_name_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _settings(tmp_path, *args)


def test_unreadable_token_or_root(tmp_path: Path) -> None:
    p = make_parser()
    with pytest.raises(ConfigError, match="--token-file"):
        AgentSettings.from_args(p.parse_args(["agent", "--token-file", str(tmp_path / "none"), "--out-dir", "o"]))
    token = _token(tmp_path)
    with pytest.raises(ConfigError, match="--root-cert"):
        AgentSettings.from_args(
            p.parse_args(["agent", "--token-file", str(token), "--root-cert", str(tmp_path / "none"), "--out-dir", "o"])
        )
