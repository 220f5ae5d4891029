"""The local CA issuer with its CA keypair in Vault KV, against a real OpenBao.

Reading the seed's layout (v1 and v2) is in test_vault_behaviours.py (fake and OpenBao);
here: the real configuration path and re-reads after rotations and broken writes.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from csr_service.config import Config, resolve
from csr_service.plugins.registry import create_issuer
from issuers.local.issuer import LocalCAIssuer
from tests.integration.vault.conftest import CONTEXT, VaultEnv, random_name
from tests.support import pki
from tests.support.certs import write_ca_dir
from tests.support.issuers import signing_request
from tests.support.waiting import wait_for_async

pytestmark = pytest.mark.vault


def _new_ca(tmp: Path, **kw: Any) -> tuple[dict[str, str], x509.Certificate]:
    """A CA as KV fields in the seed's layout: certificate (+chain) and privateKey."""
    cert, key, root = write_ca_dir(tmp, **kw)
    bundle = pki.certs_pem(cert, *([root] if cert != root else []))
    return {"certificate": bundle, "privateKey": pki.key_pem(key).decode()}, root


def _kv_write(env: VaultEnv, version: int, path: str, fields: dict[str, str]) -> str:
    """Write the secret; return the API path the source reads."""
    if version == 2:
        env.root.secrets.kv.v2.create_or_update_secret(path=path, secret=fields, mount_point="secret")
        return f"secret/data/{path}"
    env.root.secrets.kv.v1.create_or_update_secret(path=path, secret=fields, mount_point="kv1")
    return f"kv1/{path}"


def _values(env: VaultEnv, tmp: Path, kv_path: str, version: int, **extra: Any) -> dict[str, Any]:
    return env.connection_values(
        tmp,
        auth="approle",
        **{
            "local-ca-vault-kv-path": kv_path,
            "local-ca-vault-kv-version": version,
            "local-ca-reload-interval": timedelta(0),
            **extra,
        },
    )


def test_seed_layout_through_the_real_config(vault_env: VaultEnv, tmp_path: Path) -> None:
    """``--issuer local --local-ca-vault-kv-path secret/data/pki/istiod`` as an operator types it."""
    fields, _ = _new_ca(tmp_path / "ca")
    _kv_write(vault_env, 2, "pki/istiod", fields)
    conn = vault_env.connection_values(tmp_path, auth="approle")
    flags = {
        "issuer": "local",
        "local-ca-vault-kv-path": "secret/data/pki/istiod",
        "root-ca-file": str(tmp_path / "ca" / "root-cert.pem"),
        **{k: v for k, v in conn.items() if k.startswith("vault-") and k != "vault-timeout"},
    }
    config = Config.from_values(resolve(flags, env={}))
    assert "vault-address" in config.issuer.values, (
        "the local issuer plugin must declare the vault-* connection options it reads"
    )
    issuer = create_issuer(config.issuer.name, config.issuer.values, CONTEXT)

    async def body() -> None:
        await issuer.start()  # type: ignore[attr-defined]
        await issuer.stop()  # type: ignore[attr-defined]

    asyncio.run(body())


def test_reread_keeps_the_last_good_ca(vault_env: VaultEnv, tmp_path: Path) -> None:
    first, _ = _new_ca(tmp_path / "ca1")
    second, root2 = _new_ca(tmp_path / "ca2")
    name = f"pki/{random_name('rotating')}"
    kv_path = _kv_write(vault_env, 2, name, first)
    issuer = create_issuer("local", _values(vault_env, tmp_path, kv_path, 2), CONTEXT)
    assert isinstance(issuer, LocalCAIssuer)

    async def body() -> None:
        await issuer.start()
        try:
            good = issuer.material.digest
            # A broken write (key of another CA) is refused; the old CA keeps signing.
            _kv_write(vault_env, 2, name, {"certificate": first["certificate"], "privateKey": second["privateKey"]})
            assert await issuer.reload() is False
            assert issuer.material.digest == good
            ok, reason = issuer.health()
            assert ok
            assert "last reload failed" in reason
            # A missing secret is a failed read too: still the old CA.
            vault_env.root.secrets.kv.v2.delete_metadata_and_all_versions(path=name, mount_point="secret")
            assert await issuer.reload() is False
            assert issuer.material.digest == good
            await issuer.sign(signing_request())
            # A good rotation is adopted.
            _kv_write(vault_env, 2, name, second)
            assert await issuer.reload() is True
            assert list(await issuer.roots()) == [root2]
        finally:
            await issuer.stop()

    asyncio.run(body())


def test_periodic_reread_picks_up_a_rotation(vault_env: VaultEnv, tmp_path: Path) -> None:
    first, _ = _new_ca(tmp_path / "ca1")
    second, root2 = _new_ca(tmp_path / "ca2")
    name = f"pki/{random_name('periodic')}"
    kv_path = _kv_write(vault_env, 2, name, first)
    values = _values(vault_env, tmp_path, kv_path, 2, **{"local-ca-reload-interval": timedelta(milliseconds=200)})
    issuer = create_issuer("local", values, CONTEXT)
    assert isinstance(issuer, LocalCAIssuer)

    async def body() -> None:
        await issuer.start()
        try:
            _kv_write(vault_env, 2, name, second)

            async def rotated() -> bool:
                return list(await issuer.roots()) == [root2]

            await wait_for_async(rotated, timeout=10, what="the periodic re-read to pick up the rotated CA")
        finally:
            await issuer.stop()

    asyncio.run(body())
