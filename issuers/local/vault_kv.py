"""A :class:`~issuers.local.issuer.MaterialSource` reading the CA from Vault KV.

Some operators keep the mesh CA's certificate and key in Vault KV rather than in a Kubernetes
Secret (the seed's example: ``secret/data/pki/istiod`` with fields ``certificate`` and
``privateKey``). This source reads that secret through the same long-lived, renewed
:class:`~issuers.vault_connection.client.VaultClient` as the Vault issuer (``--vault-*``
options), and the local issuer does the rest: it checks the pair, re-reads it every
``--local-ca-reload-interval`` and keeps the last good CA when a read fails or returns
something unusable.

Every failure is raised as :class:`CAMaterialError`, which is what the local issuer's
reload loop expects (anything else would end the loop).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from csr_service.common.errors import ConfigError, CSRServiceError, FailedPreconditionError
from csr_service.infra.cpu import run_cpu
from csr_service.pki.chain import is_self_signed
from csr_service.pki.pem import certs_to_pem
from issuers.local.material import CAMaterial, CAMaterialError, load_ca_pem
from issuers.vault_connection.client import VaultClient, response_object
from issuers.vault_connection.settings import ConnectionSettings

__all__ = ["KVSettings", "VaultKVSource", "create_source"]


@dataclass(frozen=True, slots=True)
class KVSettings:
    """Where the CA lives in KV and under which field names."""

    path: str
    version: int
    cert_field: str
    key_field: str
    chain_field: str | None
    root_field: str | None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> KVSettings:
        """Validate the ``local-ca-vault-*`` options; ConfigError names the flag."""
        path = str(values.get("local-ca-vault-kv-path") or "").strip("/")
        version = int(values.get("local-ca-vault-kv-version", 2))
        if version not in (1, 2):
            raise ConfigError("--local-ca-vault-kv-version: 1 or 2")
        if not path or "//" in path:
            raise ConfigError(f"--local-ca-vault-kv-path: not a Vault path {path!r}")
        if version == 2 and "/data/" not in f"/{path}":
            # KV v2's API path has "data/" after the mount; we cannot guess where the mount ends.
            raise ConfigError(
                f"--local-ca-vault-kv-path: {path!r} is not a KV v2 API path; put data/ after the mount, "
                "e.g. secret/data/pki/istiod (or set --local-ca-vault-kv-version 1)"
            )
        cert_field = str(values.get("local-ca-vault-cert-field") or "certificate")
        key_field = str(values.get("local-ca-vault-key-field") or "privateKey")
        return cls(
            path=path,
            version=version,
            cert_field=cert_field,
            key_field=key_field,
            chain_field=values.get("local-ca-vault-chain-field") or None,
            root_field=values.get("local-ca-vault-root-field") or None,
        )


def _pem_bytes(value: Any, what: str) -> bytes:
    """A field as PEM bytes; base64-encoded PEM (as some tools store it) is accepted too."""
    if not isinstance(value, str) or not value.strip():
        raise CAMaterialError(f"{what} is empty or not a string")
    if "-----BEGIN" in value:
        return value.encode()
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CAMaterialError(f"{what} is neither PEM nor base64-encoded PEM") from exc
    if b"-----BEGIN" not in decoded:
        raise CAMaterialError(f"{what} is neither PEM nor base64-encoded PEM")
    return decoded


class VaultKVSource:
    """The CA certificate and key from one Vault KV secret (v1 or v2)."""

    def __init__(self, client: VaultClient, settings: KVSettings) -> None:
        self._client = client
        self._settings = settings
        self._started = False

    def __repr__(self) -> str:
        return f"VaultKVSource({self.describe()!r})"

    def describe(self) -> str:
        return f"Vault KV v{self._settings.version} {self._client.settings.address}/v1/{self._settings.path}"

    async def load(self) -> CAMaterial:
        """Read and check the CA; CAMaterialError for anything unusable (Vault down included)."""
        try:
            if not self._started:
                await self._client.start()  # log in once; the client renews from then on
                self._started = True
            resp = await self._client.call(
                VaultClient.read(self._settings.path), operation=f"read {self._settings.path}", rejected=self._missing
            )
            fields = self._fields(resp)
        except CSRServiceError as exc:
            raise CAMaterialError(f"{self.describe()}: {exc.public} ({exc.detail})") from exc
        s = self._settings
        what = self.describe()
        cert = _pem_bytes(fields.get(s.cert_field), f"{what}: field {s.cert_field!r}")
        key = _pem_bytes(fields.get(s.key_field), f"{what}: field {s.key_field!r}")
        chain = _pem_bytes(fields.get(s.chain_field), f"{what}: field {s.chain_field!r}") if s.chain_field else None
        roots = _pem_bytes(fields.get(s.root_field), f"{what}: field {s.root_field!r}") if s.root_field else None
        return await run_cpu(_build, cert, key, chain, roots, what)

    def _missing(self, detail: str) -> CSRServiceError:
        return FailedPreconditionError("the CA secret is missing in Vault KV", detail=detail)

    def _fields(self, resp: Any) -> Mapping[str, Any]:
        data = response_object(resp, "data", self._settings.path)
        if self._settings.version == 2:
            inner = data.get("data")
            if not isinstance(inner, dict):
                # KV v2 answers data=null for a deleted or destroyed latest version.
                raise CAMaterialError(f"{self.describe()}: the latest version is deleted or not a KV v2 secret")
            return inner
        return data

    async def aclose(self) -> None:
        """Stop renewing the Vault token and close connections."""
        await self._client.stop()


def _build(cert: bytes, key: bytes, chain: bytes | None, roots: bytes | None, source: str) -> CAMaterial:
    if roots is None:
        # No root field: a self-signed certificate in the cert/chain bundle is the root, as
        # with a cert-chain.pem that ends in the root.
        try:
            bundle = x509.load_pem_x509_certificates(cert + b"\n" + (chain or b""))
        except ValueError:
            bundle = []  # load_ca_pem reports the bad PEM with the field name
        found = [c for c in bundle[1:] if is_self_signed(c)]
        roots = certs_to_pem(found).encode() if found else None
    return load_ca_pem(cert, key, chain, roots, source=source)


def create_source(values: Mapping[str, Any]) -> VaultKVSource:
    """Build the source from the ``local-ca-vault-*`` and ``vault-*`` connection options."""
    return VaultKVSource(
        VaultClient(ConnectionSettings.from_values(values), name="vault-kv"), KVSettings.from_values(values)
    )
