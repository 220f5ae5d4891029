"""Validated, frozen Vault settings built from the ``vault-*`` option values.

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

from csr_service.errors import ConfigError

__all__ = [
    "AppRoleAuth",
    "AuthSettings",
    "ConnectionSettings",
    "IssuerSettings",
    "KubernetesAuth",
    "TokenAuth",
    "normalise_fingerprint",
]

AUTH_METHODS = ("token", "kubernetes", "approle")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


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
        mount = _mount(values.get("vault-kubernetes-mount") or "kubernetes", "vault-kubernetes-mount")
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
        mount = _mount(values.get("vault-approle-mount") or "approle", "vault-approle-mount")
        return AppRoleAuth(mount=mount, role_id_file=role_id_file, secret_id_file=secret_id_file)
    raise ConfigError(f"--vault-auth: unknown {method!r}; choose one of {', '.join(AUTH_METHODS)}")


def _mount(value: str, flag: str) -> str:
    mount = value.strip("/")
    if not _PATH_SEGMENT.match(mount):
        raise ConfigError(f"--{flag}: not a valid Vault path {value!r}")
    return mount


def normalise_fingerprint(text: str) -> str:
    """``AB:CD:...`` or ``abcd...`` → lowercase hex without separators."""
    return text.replace(":", "").replace(" ", "").strip().lower()


@dataclass(frozen=True, slots=True)
class IssuerSettings:
    """The PKI side: which mount/role/issuer signs, and where roots come from."""

    mount: str
    role: str
    serving_role: str
    issuer_ref: str | None
    sign_verbatim: bool
    roots_from_vault: bool
    root_fingerprints: tuple[str, ...]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> IssuerSettings:
        """Validate the PKI options; ConfigError names the flag."""
        mount = _mount(values.get("vault-mount") or "pki", "vault-mount")
        role = str(values.get("vault-role") or "")
        if not role:
            raise ConfigError("--vault-role: required with --issuer vault (the PKI role that signs)")
        for flag, name in (
            ("vault-role", role),
            ("vault-serving-role", values.get("vault-serving-role") or ""),
        ):
            if name and (not _PATH_SEGMENT.match(name) or "/" in name):
                raise ConfigError(f"--{flag}: not a valid role name {name!r}")
        ref = str(values.get("vault-issuer-ref") or "") or None
        if ref is not None and not _PATH_SEGMENT.match(ref):
            raise ConfigError(f"--vault-issuer-ref: not a valid issuer reference {ref!r}")
        fps = tuple(normalise_fingerprint(f) for f in values.get("vault-root-fingerprints", ()) or ())
        for fp in fps:
            if not re.fullmatch(r"[0-9a-f]{64}", fp):
                raise ConfigError(f"--vault-root-fingerprints: {fp!r} is not a SHA-256 fingerprint (64 hex digits)")
        roots_from_vault = bool(values.get("vault-roots-from-vault", False))
        if fps and not roots_from_vault:
            raise ConfigError("--vault-root-fingerprints: only meaningful with --vault-roots-from-vault")
        return cls(
            mount=mount,
            role=role,
            serving_role=str(values.get("vault-serving-role") or "") or role,
            issuer_ref=ref,
            sign_verbatim=bool(values.get("vault-sign-verbatim", False)),
            roots_from_vault=roots_from_vault,
            root_fingerprints=fps,
        )
