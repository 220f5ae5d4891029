"""Vault settings: validation names the flag, secrets never appear, hvac stays optional."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest

from csr_service.common.errors import ConfigError
from csr_service.plugins.registry import ISSUERS, find, kind_options
from issuers.local.vault_kv import KVSettings
from issuers.vault.settings import IssuerSettings, normalise_fingerprint
from issuers.vault_connection.settings import AppRoleAuth, ConnectionSettings, KubernetesAuth, TokenAuth

BASE = {"vault-address": "https://vault.example:8200", "vault-token-file": "/run/vault/token"}


def conn(**kw: Any) -> ConnectionSettings:
    return ConnectionSettings.from_values({**BASE, **kw})


def test_defaults_from_the_declared_options() -> None:
    values = {o.name: o.default for o in find(ISSUERS, "vault").options}
    values.update(BASE)
    values["vault-role"] = "spiffe"
    c = ConnectionSettings.from_values(values)
    assert c.auth == TokenAuth("/run/vault/token")
    assert c.timeout == timedelta(seconds=5)
    assert c.max_connections == 64
    s = IssuerSettings.from_values(values)
    assert (s.mount, s.role, s.serving_role, s.issuer_ref, s.sign_verbatim) == ("pki", "spiffe", "spiffe", None, False)


def test_auth_methods() -> None:
    k = conn(**{"vault-auth": "kubernetes", "vault-kubernetes-role": "csr", "vault-kubernetes-token-file": "/t"}).auth
    assert k == KubernetesAuth(role="csr", mount="kubernetes", token_file="/t")
    a = conn(
        **{
            "vault-auth": "approle",
            "vault-approle-mount": "/auth-approle/",
            "vault-approle-role-id-file": "/r",
            "vault-approle-secret-id-file": "/s",
        }
    ).auth
    assert a == AppRoleAuth(mount="auth-approle", role_id_file="/r", secret_id_file="/s")


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"vault-address": ""}, "--vault-address"),
        ({"vault-address": "vault:8200"}, "--vault-address"),
        ({"vault-token-file": ""}, "--vault-token-file"),
        ({"vault-auth": "ldap"}, "--vault-auth"),
        ({"vault-auth": "kubernetes"}, "--vault-kubernetes-role"),
        ({"vault-auth": "approle", "vault-approle-secret-id-file": "/s"}, "--vault-approle-role-id-file"),
        ({"vault-client-cert": "/c.pem"}, "--vault-client-cert"),
        ({"vault-timeout": timedelta(0)}, "--vault-timeout"),
        ({"vault-max-connections": 0}, "--vault-max-connections"),
    ],
)
def test_connection_errors_name_the_flag(values: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        conn(**values)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({}, "--vault-role"),
        ({"vault-role": "a/b"}, "--vault-role"),
        ({"vault-role": "r", "vault-mount": "a b"}, "--vault-mount"),
        ({"vault-role": "r", "vault-root-fingerprints": ("ab",), "vault-roots-from-vault": True}, "fingerprints"),
        ({"vault-role": "r", "vault-root-fingerprints": ("ab" * 32,)}, "--vault-roots-from-vault"),
    ],
)
def test_issuer_errors_name_the_flag(values: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        IssuerSettings.from_values(values)


def test_fingerprints_accept_openssl_format() -> None:
    fp = "AB:" * 31 + "AB"
    assert normalise_fingerprint(fp) == "ab" * 32
    s = IssuerSettings.from_values(
        {"vault-role": "r", "vault-roots-from-vault": True, "vault-root-fingerprints": (fp,)}
    )
    assert s.root_fingerprints == ("ab" * 32,)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"local-ca-vault-kv-path": "secret/pki/istiod"}, "data/"),
        ({"local-ca-vault-kv-path": "secret/data/pki", "local-ca-vault-kv-version": 3}, "1 or 2"),
    ],
)
def test_kv_settings_errors(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        KVSettings.from_values(values)


def test_kv_settings_seed_layout_defaults() -> None:
    s = KVSettings.from_values({"local-ca-vault-kv-path": "/secret/data/pki/istiod"})
    assert (s.path, s.version, s.cert_field, s.key_field) == ("secret/data/pki/istiod", 2, "certificate", "privateKey")


def test_options_are_declared_once_and_local_shares_the_connection_options() -> None:
    names = [o.name for o in kind_options(ISSUERS)]
    assert len(names) == len(set(names))
    local = {o.name: o for o in find(ISSUERS, "local").options}
    vault = {o.name: o for o in find(ISSUERS, "vault").options}
    assert {"vault-address", "vault-auth", "local-ca-vault-kv-path"} <= set(local)
    assert "vault-role" not in local
    assert local["vault-address"] is vault["vault-address"]  # one declaration, read by both plugins


def test_no_option_holds_a_secret_value() -> None:
    # Secrets live in files named by options, read at login time, never in flags/env/config.
    for o in find(ISSUERS, "vault").options:
        assert "token" not in o.name or o.name.endswith("-file")


def test_the_core_and_option_modules_do_not_import_hvac() -> None:
    code = (
        "import sys, csr_service.config, issuers.vault, issuers.vault.settings, issuers.vault_connection.settings;"
        "assert 'hvac' not in sys.modules, 'hvac imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
