"""Trust-bundle sources: parsing, file reload, ConfigMap/Secret content, last-good on bad input."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from kubernetes import client as k8s

from csr_service.kube.refs import ObjectRef
from csr_service.trust.bundle import TrustBundle
from csr_service.trust.sources import FileTrustSource, KubeTrustSource, parse_roots
from tests.support.certs import write_ca_dir
from tests.support.pki import KeyPair, certs_pem, new_key, sign_leaf


def test_parse_roots_wants_ca_certificates(tmp_path: Path) -> None:
    cert, key, root = write_ca_dir(tmp_path / "ca")
    assert parse_roots(certs_pem(root).encode(), "x") == [root]
    with pytest.raises(ValueError, match=r"^x: "):
        parse_roots(b"junk", "x")
    leaf = sign_leaf(KeyPair(cert, key), new_key().public_key(), uris=("spiffe://td/ns/a/sa/b",))
    with pytest.raises(ValueError, match="not a CA"):
        parse_roots(certs_pem(leaf).encode(), "x")


def test_file_source_adopts_changes_and_keeps_last_good(tmp_path: Path) -> None:
    _, _, root1 = write_ca_dir(tmp_path / "ca1")
    _, _, root2 = write_ca_dir(tmp_path / "ca2")
    path = tmp_path / "bundle.pem"
    path.write_text(certs_pem(root1))
    trust = TrustBundle.from_file(str(path))
    seen: list[int] = []
    trust.add_listener(lambda snap: seen.append(len(snap.roots)))
    source = FileTrustSource(str(path), trust)
    assert not source.check()  # unchanged
    path.write_text(certs_pem(root1) + certs_pem(root2))
    assert source.check()
    path.write_text("garbage")
    assert not source.check()
    path.unlink()
    assert not source.check()
    assert trust.current.roots == (root1, root2)
    assert seen == [2]


@pytest.mark.parametrize("secret", [False, True])
def test_kube_source_reads_its_key_and_ignores_bad_updates(tmp_path: Path, secret: bool) -> None:
    _, _, root1 = write_ca_dir(tmp_path / "ca1")
    _, _, root2 = write_ca_dir(tmp_path / "ca2")
    trust = TrustBundle([root1])
    source = KubeTrustSource(None, trust, ObjectRef("ns", "roots", "bundle.pem"), secret=secret)

    def obj(pem: str) -> object:
        meta = k8s.V1ObjectMeta(name="roots", namespace="ns")
        if secret:
            return k8s.V1Secret(metadata=meta, data={"bundle.pem": base64.b64encode(pem.encode()).decode()})
        return k8s.V1ConfigMap(metadata=meta, data={"bundle.pem": pem})

    source.on_event("MODIFIED", obj(certs_pem(root1) + certs_pem(root2)))
    assert trust.current.roots == (root1, root2)
    source.on_event("MODIFIED", obj("nonsense"))
    source.on_event("DELETED", obj(""))
    assert trust.current.roots == (root1, root2)
    source.on_event("MODIFIED", obj(certs_pem(root2)))
    assert trust.current.roots == (root2,)  # type: ignore[comparison-overlap]
