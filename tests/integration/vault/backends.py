"""One Vault, two implementations: the in-memory fake and the test bed's real OpenBao.

A behaviour the fake imitates is tested by one test body run against both
(tests/integration/vault/test_vault_behaviours.py): the ``vault_backend`` fixture yields a
:class:`FakeBackend` and, marked ``vault``, an :class:`OpenBaoBackend`. Both offer the same
layout (mounts ``pki`` and ``pki_int``; roles ``spiffe``, ``short``, ``no-spiffe``, ``mesh``;
token and approle auth), so ``pytest -m "not vault"`` still runs every body against the fake.

``outage_backend`` does the same for an outage: the fake is made unreachable or sealed, the
real one is a separate OpenBao with persistent storage that is stopped, restarted sealed and
unsealed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from csr_service.plugins.registry import create_issuer
from issuers.local.issuer import LocalCAIssuer
from issuers.local.vault_kv import KVSettings, VaultKVSource
from issuers.vault.issuer import VaultIssuer, create
from tests.integration.vault.conftest import CONTEXT, RestartableOpenBao, VaultEnv
from tests.support.fake_vault import FakeVault, fake_client, fake_values, make_issuer
from tests.testbed.openbao import POLICY

__all__ = ["FakeBackend", "FakeOutage", "OpenBaoBackend", "OpenBaoOutage", "VaultBackend", "VaultOutage"]


def client_token(issuer: VaultIssuer) -> str:
    """The Vault token the issuer's client holds now (to revoke it behind its back)."""
    return str(issuer._client._hvac.token)


class VaultBackend(Protocol):
    """What a behaviour test needs from a Vault, fake or real."""

    name: str

    def values(
        self, tmp: Path, *, auth: str = "token", mount: str = "pki", role: str = "spiffe", **extra: Any
    ) -> dict[str, Any]:
        """``vault-*`` option values with fresh credential files under ``tmp``."""

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        """A fresh, unstarted issuer for these values."""

    def root(self, mount: str) -> x509.Certificate:
        """The root the mount's leaves chain to."""

    def expected_chain(self, mount: str) -> list[x509.Certificate]:
        """The CA certificates the issuer must return for the mount, issuing CA first."""

    def issuer_ref(self, mount: str) -> str:
        """The id of the mount's default PKI issuer (for ``--vault-issuer-ref``)."""

    def revoke(self, token: str) -> None:
        """Revoke a Vault token, as an operator or an expiring lease would."""

    def new_token(self) -> str:
        """A fresh token with the signing policies (what Vault Agent writes into the file)."""

    def kv_write(self, version: int, name: str, fields: Mapping[str, str]) -> str:
        """Store ``fields`` in KV (v1 or v2) under ``pki/<name>``; the API path to read it."""

    def local_issuer(self, values: Mapping[str, Any]) -> LocalCAIssuer:
        """The local issuer reading its CA from this Vault's KV (``local-ca-vault-*`` values)."""


@dataclass
class FakeBackend:
    """The in-memory fake (tests/support/fake_vault.py)."""

    fake: FakeVault
    name: str = "fake"

    def values(
        self, tmp: Path, *, auth: str = "token", mount: str = "pki", role: str = "spiffe", **extra: Any
    ) -> dict[str, Any]:
        return fake_values(self.fake, tmp, auth, **{"vault-mount": mount, "vault-role": role, **extra})

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        return make_issuer(self.fake, dict(values))

    def root(self, mount: str) -> x509.Certificate:
        return self.fake.root.cert

    def expected_chain(self, mount: str) -> list[x509.Certificate]:
        return list(self.fake.mounts[mount].ca_chain)

    def issuer_ref(self, mount: str) -> str:
        return self.fake.mounts[mount].issuer_ref

    def revoke(self, token: str) -> None:
        self.fake.revoke(token)

    def new_token(self) -> str:
        return self.fake.issue_token()

    def kv_write(self, version: int, name: str, fields: Mapping[str, str]) -> str:
        path = f"secret/data/pki/{name}" if version == 2 else f"kv1/pki/{name}"
        self.fake.kv[path] = {"data": dict(fields), "metadata": {}} if version == 2 else dict(fields)
        return path

    def local_issuer(self, values: Mapping[str, Any]) -> LocalCAIssuer:
        # What issuers.local.vault_kv.create_source builds, on the fake's transport.
        source = VaultKVSource(fake_client(self.fake, dict(values)), KVSettings.from_values(values))
        return LocalCAIssuer(source, reload_interval=values["local-ca-reload-interval"])


@dataclass
class OpenBaoBackend:
    """The test bed's OpenBao with this suite's roles (tests/integration/vault/conftest.py)."""

    env: VaultEnv
    name: str = "openbao"

    def values(
        self, tmp: Path, *, auth: str = "token", mount: str = "pki", role: str = "spiffe", **extra: Any
    ) -> dict[str, Any]:
        return self.env.issuer_values(tmp, auth=auth, mount=mount, role=role, **extra)

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        return create(values, CONTEXT)

    def root(self, mount: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.env.bao.mounts[mount].root_pem.encode())

    def expected_chain(self, mount: str) -> list[x509.Certificate]:
        # The test bed imported neither root into pki_int: its ca_chain ends at the intermediate.
        return [x509.load_pem_x509_certificate(self.env.bao.mounts[mount].issuing_ca_pem.encode())]

    def issuer_ref(self, mount: str) -> str:
        return str(self.env.root.read(f"{mount}/config/issuers")["data"]["default"])

    def revoke(self, token: str) -> None:
        self.env.root.auth.token.revoke(token)

    def new_token(self) -> str:
        return self.env.token()

    def kv_write(self, version: int, name: str, fields: Mapping[str, str]) -> str:
        kv = self.env.root.secrets.kv
        if version == 2:
            kv.v2.create_or_update_secret(path=f"pki/{name}", secret=dict(fields), mount_point="secret")
            return f"secret/data/pki/{name}"
        kv.v1.create_or_update_secret(path=f"pki/{name}", secret=dict(fields), mount_point="kv1")
        return f"kv1/pki/{name}"

    def local_issuer(self, values: Mapping[str, Any]) -> LocalCAIssuer:
        issuer = create_issuer("local", values, CONTEXT)
        assert isinstance(issuer, LocalCAIssuer)
        return issuer


class VaultOutage(Protocol):
    """A Vault a test may take away, bring back sealed, and unseal."""

    name: str

    def values(self, tmp: Path) -> dict[str, Any]:
        """Token-auth issuer values for mount ``pki``, role ``spiffe``, a 2 s timeout."""

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        """A fresh, unstarted issuer."""

    def stop(self) -> None:
        """Vault goes away: connections are refused."""

    def start_sealed(self) -> None:
        """Vault is back, sealed."""

    def unseal(self) -> None:
        """Vault is unsealed and serves again."""


@dataclass
class FakeOutage:
    fake: FakeVault
    name: str = "fake"

    def values(self, tmp: Path) -> dict[str, Any]:
        return fake_values(self.fake, tmp, "token", **{"vault-mount": "pki"})

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        return make_issuer(self.fake, dict(values))

    def stop(self) -> None:
        self.fake.down = True

    def start_sealed(self) -> None:
        self.fake.down, self.fake.sealed = False, True

    def unseal(self) -> None:
        self.fake.sealed = False


@dataclass
class OpenBaoOutage:
    bao: RestartableOpenBao
    name: str = "openbao"

    def values(self, tmp: Path) -> dict[str, Any]:
        token = self.bao.client().auth.token.create(policies=[POLICY], ttl="1h")["auth"]["client_token"]
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "token").write_text(token)
        return {
            "vault-address": self.bao.address,
            "vault-auth": "token",
            "vault-token-file": str(tmp / "token"),
            "vault-mount": "pki",
            "vault-role": "spiffe",
            "vault-timeout": timedelta(seconds=2),
        }

    def issuer(self, values: Mapping[str, Any]) -> VaultIssuer:
        return create(values, CONTEXT)

    def stop(self) -> None:
        self.bao.stop()

    def start_sealed(self) -> None:
        # Blocking the event loop for the restart is fine here; starting from the main thread
        # keeps the server's parent-death signal tied to the test process, not a worker thread.
        self.bao.start(unseal=False)

    def unseal(self) -> None:
        self.bao.unseal()
