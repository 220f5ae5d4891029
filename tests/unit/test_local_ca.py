"""Local CA material: layouts, checks at load, reload keeping the last good CA."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from issuers.local.issuer import DirectorySource, LocalCAIssuer
from issuers.local.material import CAMaterialError, load_ca_dir
from tests.support import pki
from tests.support.certs import write_ca_dir
from tests.support.pki import certs_pem, key_pem, new_key
from tests.support.waiting import wait_for_async


@pytest.mark.parametrize("layout", ["cacerts", "tls"])
@pytest.mark.parametrize("intermediate", [False, True])
def test_layouts_load(tmp_path: Path, layout: str, intermediate: bool) -> None:
    cert, _, root = write_ca_dir(tmp_path, layout=layout, intermediate=intermediate)
    m = load_ca_dir(tmp_path)
    assert m.cert == cert
    assert m.roots == (root,)
    assert (m.cert != root) is intermediate
    assert m.intermediates == ()  # nothing between the signing cert and the root


def test_two_level_intermediates(tmp_path: Path) -> None:
    root = pki.make_ca("root", path_length=2)
    i1 = pki.make_ca("i1", parent=root, path_length=1)
    i2 = pki.make_ca("i2", "rsa", parent=i1, path_length=0)
    (tmp_path / "ca-cert.pem").write_bytes(i2.cert_pem)
    (tmp_path / "ca-key.pem").write_bytes(i2.key_pem)
    (tmp_path / "cert-chain.pem").write_text(certs_pem(i2.cert, root.cert, i1.cert))  # any order
    (tmp_path / "root-cert.pem").write_bytes(root.cert_pem)
    m = load_ca_dir(tmp_path)
    assert m.cert == i2.cert
    assert m.intermediates == (i1.cert,)


def test_self_signed_without_root_file(tmp_path: Path) -> None:
    write_ca_dir(tmp_path, layout="tls")
    (tmp_path / "ca.crt").unlink()
    assert len(load_ca_dir(tmp_path).roots) == 1


def test_multiple_roots_in_bundle(tmp_path: Path) -> None:
    write_ca_dir(tmp_path)
    other = pki.make_ca("next root")
    with (tmp_path / "root-cert.pem").open("a") as fh:
        fh.write(certs_pem(other.cert))
    assert len(load_ca_dir(tmp_path).roots) == 2


def test_key_mismatch(tmp_path: Path) -> None:
    write_ca_dir(tmp_path)
    (tmp_path / "ca-key.pem").write_bytes(key_pem(new_key()))
    with pytest.raises(CAMaterialError, match="does not match"):
        load_ca_dir(tmp_path)


def test_not_a_ca(tmp_path: Path) -> None:
    write_ca_dir(tmp_path)
    root = pki.make_ca("r")
    leaf_key = new_key()
    leaf = pki.sign_leaf(root, leaf_key.public_key(), dns=["x"])
    (tmp_path / "ca-cert.pem").write_text(certs_pem(leaf))
    (tmp_path / "ca-key.pem").write_bytes(key_pem(leaf_key))
    (tmp_path / "cert-chain.pem").write_text(certs_pem(leaf))
    (tmp_path / "root-cert.pem").write_bytes(root.cert_pem)
    with pytest.raises(CAMaterialError, match="not a CA"):
        load_ca_dir(tmp_path)


def test_expired(tmp_path: Path) -> None:
    write_ca_dir(tmp_path, lifetime=timedelta(days=1))
    with pytest.raises(CAMaterialError, match="expired"):
        load_ca_dir(tmp_path, now=datetime.now(UTC) + timedelta(days=2))


def test_chain_does_not_reach_root(tmp_path: Path) -> None:
    write_ca_dir(tmp_path, intermediate=True)
    (tmp_path / "root-cert.pem").write_bytes(pki.make_ca("unrelated").cert_pem)
    with pytest.raises(CAMaterialError, match="does not chain"):
        load_ca_dir(tmp_path)


def test_missing_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(CAMaterialError, match="neither"):
        load_ca_dir(tmp_path)
    write_ca_dir(tmp_path)
    (tmp_path / "ca-key.pem").write_text("garbage")
    with pytest.raises(CAMaterialError, match="private key"):
        load_ca_dir(tmp_path)


def test_reload_adopts_good_and_keeps_last_good_on_bad(tmp_path: Path) -> None:
    first, _, _ = write_ca_dir(tmp_path)
    issuer = LocalCAIssuer(DirectorySource(str(tmp_path)), reload_interval=timedelta(0))
    changes: list[list[x509.Certificate]] = []
    issuer.add_roots_listener(lambda roots: changes.append(list(roots)))

    async def scenario() -> None:
        await issuer.start()
        assert issuer.material.cert == first
        assert await issuer.reload() is False  # unchanged content: no-op
        (tmp_path / "ca-key.pem").write_text("broken")
        assert await issuer.reload() is False
        assert issuer.material.cert == first  # last good kept
        ok, why = issuer.health()
        assert ok
        assert "last reload failed" in why
        second, _, second_root = write_ca_dir(tmp_path)
        assert await issuer.reload() is True
        assert issuer.material.cert == second
        assert changes == [[second_root]]
        assert "last reload failed" not in issuer.health()[1]

    asyncio.run(scenario())


def test_watch_task_picks_up_changes(tmp_path: Path) -> None:
    write_ca_dir(tmp_path)
    issuer = LocalCAIssuer(DirectorySource(str(tmp_path)), reload_interval=timedelta(milliseconds=50))

    async def scenario() -> None:
        await issuer.start()
        new, _, _ = write_ca_dir(tmp_path)
        try:
            await wait_for_async(lambda: issuer.material.cert == new, timeout=5, what="the watch to load the new CA")
        finally:
            await issuer.stop()

    asyncio.run(scenario())


def test_leaf_never_outlives_ca(tmp_path: Path) -> None:
    write_ca_dir(tmp_path, lifetime=timedelta(minutes=30))
    from tests.support.issuers import signing_request

    issuer = LocalCAIssuer(DirectorySource(str(tmp_path)), reload_interval=timedelta(0))

    async def scenario() -> datetime:
        await issuer.start()
        issued = await issuer.sign(signing_request(ttl=timedelta(hours=5)))
        return issued.leaf.not_valid_after_utc

    assert asyncio.run(scenario()) <= issuer.material.not_after
