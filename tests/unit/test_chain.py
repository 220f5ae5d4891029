"""Chain ordering and path building."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from csr_service.pki.certs import LeafSpec, build_intermediate_ca, build_leaf, build_self_signed_ca
from csr_service.pki.chain import ChainError, build_path, named_issuer_of, order_chain
from csr_service.pki.keys import KeyType, generate_key


def _pki() -> tuple[Any, Any, Any]:
    now = datetime.now(UTC)
    rk = generate_key(KeyType.EC_P256)
    root = build_self_signed_ca(rk, common_name="root", path_length=2)
    ik = generate_key(KeyType.EC_P256)
    inter = build_intermediate_ca(ik, root, rk, common_name="inter")
    lk = generate_key(KeyType.EC_P256)
    leaf = build_leaf(
        lk.public_key(), LeafSpec(not_after=now + timedelta(hours=1), uris=["spiffe://td/ns/a/sa/b"]), inter, ik
    )
    return root, inter, leaf


def test_order_chain_dedupes_orders_and_drops_strangers() -> None:
    root, inter, leaf = _pki()
    stranger = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="stranger")
    assert order_chain(leaf, [root, stranger, inter, root, leaf, inter]) == [inter, root]
    assert order_chain(leaf, [inter]) == [inter]
    assert order_chain(leaf, []) == []


def test_same_name_other_key_is_not_linked_when_key_ids_differ() -> None:
    root, _, leaf = _pki()
    impostor = build_intermediate_ca(
        generate_key(KeyType.EC_P256), root, generate_key(KeyType.EC_P256), common_name="inter"
    )
    assert not named_issuer_of(leaf, impostor)  # AKI of the leaf names the real intermediate's key


def test_build_path_verifies_signatures() -> None:
    root, inter, leaf = _pki()
    assert build_path(leaf, [root, inter], [root], now=datetime.now(UTC)) == [leaf, inter, root]
    other_root = build_self_signed_ca(generate_key(KeyType.EC_P256), common_name="root", path_length=2)
    with pytest.raises(ChainError):
        build_path(leaf, [inter], [other_root], now=datetime.now(UTC))  # same name, wrong key
    with pytest.raises(ChainError, match="expired"):
        build_path(leaf, [inter], [root], now=datetime.now(UTC) + timedelta(days=400))
