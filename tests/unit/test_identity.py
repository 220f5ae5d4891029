"""SPIFFE ids and service-account usernames are matched exactly: no trailing newline, no extras."""

from __future__ import annotations

import pytest

from csr_service.common.identity import SpiffeId, parse_spiffe_id, service_account_from_username


def test_istio_identity_round_trips() -> None:
    uri = "spiffe://cluster.local/ns/default/sa/sleep"
    assert parse_spiffe_id(uri) == SpiffeId("cluster.local", "default", "sleep")
    assert parse_spiffe_id(uri).uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        # `$` matches before a final newline: these were accepted, and certified, before.
        "spiffe://cluster.local/ns/default/sa/sleep\n",
        "spiffe://cluster.local/ns/default\n/sa/sleep",
        "spiffe://cluster.local\n/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/default/sa/Sleep",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns/default/sa/sleep/extra",
        "spiffe://cluster.local/ns/-bad/sa/sleep",
        "spiffe://clu ster.local/ns/default/sa/sleep",
        "https://cluster.local/ns/default/sa/sleep",
    ],
)
def test_malformed_spiffe_ids_are_refused(uri: str) -> None:
    with pytest.raises(ValueError, match=r"SPIFFE|form|invalid"):
        parse_spiffe_id(uri)


def test_service_account_username() -> None:
    assert service_account_from_username("system:serviceaccount:istio-system:ztunnel") == ("istio-system", "ztunnel")


@pytest.mark.parametrize(
    "username",
    [
        "system:serviceaccount:default:sleep\n",
        "system:serviceaccount:default\n:sleep",
        "system:serviceaccount:default:sleep:x",
        "system:serviceaccount::sleep",
        "system:serviceaccounts:default:sleep",
        "alice",
    ],
)
def test_malformed_usernames_are_refused(username: str) -> None:
    with pytest.raises(ValueError, match="service"):
        service_account_from_username(username)
