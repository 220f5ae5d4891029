"""Validated, frozen settings of the Vault PKI issuer (the ``vault-*`` PKI options).

Kept free of ``hvac`` so configuration errors are reported (naming the flag) before any
backend library is imported. The connection and login settings are in
:mod:`issuers.vault_connection.settings`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csr_service.common.errors import ConfigError
from issuers.vault_connection.settings import PATH_SEGMENT, mount_path

__all__ = ["IssuerSettings", "normalise_fingerprint"]


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
        mount = mount_path(values.get("vault-mount") or "pki", "vault-mount")
        role = str(values.get("vault-role") or "")
        if not role:
            raise ConfigError("--vault-role: required with --issuer vault (the PKI role that signs)")
        for flag, name in (
            ("vault-role", role),
            ("vault-serving-role", values.get("vault-serving-role") or ""),
        ):
            if name and (not PATH_SEGMENT.fullmatch(name) or "/" in name):
                raise ConfigError(f"--{flag}: not a valid role name {name!r}")
        ref = str(values.get("vault-issuer-ref") or "") or None
        if ref is not None and not PATH_SEGMENT.fullmatch(ref):
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
