"""Validated, frozen Vault connection and login settings (the ``vault-*`` connection options).

Shared by the Vault PKI issuer and the local issuer's Vault-KV CA source.

Kept free of ``hvac`` so configuration errors are reported (naming the flag) before any
backend library is imported. Secrets are never held here: only the *files* that contain
them, read at login time, so neither ``repr`` nor a config dump can leak a token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from csr_service.common.errors import ConfigError

__all__ = [
    "AUTH_METHODS",
    "PATH_SEGMENT",
    "AppRoleAuth",
    "AuthSettings",
    "ConnectionSettings",
    "KubernetesAuth",
    "TokenAuth",
    "mount_path",
]

AUTH_METHODS = ("token", "kubernetes", "approle")
PATH_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


@dataclass(frozen=True, slots=True)
class TokenAuth:
    """A token read from ``token_file`` (e.g. a Vault Agent sink or a mounted Secret)."""

    token_file: str

    def describe(self) -> str:
        return f"token from {self.token_file}"


@dataclass(frozen=True, slots=True)
class KubernetesAuth:
    """``auth/<mount>/login {role, jwt}`` with the projected service-account token."""

    role: str
    mount: str
    token_file: str

    def describe(self) -> str:
        return f"kubernetes auth (mount {self.mount}, role {self.role})"


@dataclass(frozen=True, slots=True)
class AppRoleAuth:
    """``auth/<mount>/login {role_id, secret_id}`` with both read from files."""

    mount: str
    role_id_file: str
    secret_id_file: str

    def describe(self) -> str:
        return f"approle auth (mount {self.mount})"


AuthSettings = TokenAuth | KubernetesAuth | AppRoleAuth


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """Where Vault is and how to log in; shared by the issuer and the Vault-KV CA source."""

    address: str
    namespace: str | None
    ca_bundle: str | None
    client_cert: str | None
    client_key: str | None
    timeout: timedelta
    max_connections: int
    auth: AuthSettings

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> ConnectionSettings:
        """Validate the ``vault-*`` connection/auth options; ConfigError names the flag."""
        address = str(values.get("vault-address") or "").rstrip("/")
        if not address:
            raise ConfigError("--vault-address: required (e.g. https://vault.vault.svc:8200)")
        parts = urlsplit(address)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ConfigError(f"--vault-address: expected http(s)://HOST[:PORT], got {address!r}")
        cert = values.get("vault-client-cert") or None
        key = values.get("vault-client-key") or None
        if bool(cert) != bool(key):
            raise ConfigError("--vault-client-cert/--vault-client-key: give both or neither")
        timeout: timedelta = values.get("vault-timeout", timedelta(seconds=5))
        if timeout <= timedelta(0):
            raise ConfigError("--vault-timeout: must be positive")
        max_conn = int(values.get("vault-max-connections", 64))
        if not 1 <= max_conn <= 1024:
            raise ConfigError("--vault-max-connections: must be between 1 and 1024")
        return cls(
            address=address,
            namespace=values.get("vault-namespace") or None,
            ca_bundle=values.get("vault-ca-bundle") or None,
            client_cert=cert,
            client_key=key,
            timeout=timeout,
            max_connections=max_conn,
            auth=_auth_from_values(values),
        )


def _auth_from_values(values: Mapping[str, Any]) -> AuthSettings:
    method = str(values.get("vault-auth") or "token")
    if method == "token":
        token_file = values.get("vault-token-file") or ""
        if not token_file:
            raise ConfigError("--vault-token-file: required with --vault-auth token")
        return TokenAuth(token_file=token_file)
    if method == "kubernetes":
        role = values.get("vault-kubernetes-role") or ""
        if not role:
            raise ConfigError("--vault-kubernetes-role: required with --vault-auth kubernetes")
        mount = mount_path(values.get("vault-kubernetes-mount") or "kubernetes", "vault-kubernetes-mount")
        token_file = values.get("vault-kubernetes-token-file") or ""
        if not token_file:
            raise ConfigError("--vault-kubernetes-token-file: required with --vault-auth kubernetes")
        return KubernetesAuth(role=role, mount=mount, token_file=token_file)
    if method == "approle":
        role_id_file = values.get("vault-approle-role-id-file") or ""
        secret_id_file = values.get("vault-approle-secret-id-file") or ""
        if not role_id_file:
            raise ConfigError("--vault-approle-role-id-file: required with --vault-auth approle")
        if not secret_id_file:
            raise ConfigError("--vault-approle-secret-id-file: required with --vault-auth approle")
        mount = mount_path(values.get("vault-approle-mount") or "approle", "vault-approle-mount")
        return AppRoleAuth(mount=mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    raise ConfigError(f"--vault-auth: unknown {method!r}; choose one of {', '.join(AUTH_METHODS)}")


def mount_path(value: str, flag: str) -> str:
    mount = value.strip("/")
    if not PATH_SEGMENT.fullmatch(mount):
        raise ConfigError(f"--{flag}: not a valid Vault path {value!r}")
    return mount
