"""The leaf fast path writes exactly the DER cryptography's CertificateBuilder writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from csr_service.pki import der
from csr_service.pki.certs import LeafSpec, _LeafTemplate, build_self_signed_ca
from csr_service.pki.keys import KeyType, generate_key, signature_hash

CAS = {
    kind: (key, build_self_signed_ca(key, common_name=f"ca {kind.value}"))
    for kind in KeyType
    for key in [generate_key(kind)]
}
LEAF_KEYS = [generate_key(kind).public_key() for kind in KeyType]

_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_times = st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2090, 12, 31), timezones=st.just(UTC)
) | st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(timezone(timedelta(hours=5)))
)


@settings(max_examples=150, deadline=None)
@given(
    ca=st.sampled_from(sorted(CAS, key=lambda k: k.value)),
    key=st.sampled_from(range(len(LEAF_KEYS))),
    uris=st.lists(_label.map(lambda s: f"spiffe://cluster.local/ns/{s}/sa/{s}"), max_size=3),
    dns=st.lists(_label.map(lambda s: f"{s}.example.svc"), max_size=3),
    ips=st.lists(st.ip_addresses().map(str), max_size=2),
    not_before=_times,
    lifetime=st.integers(min_value=0, max_value=10 * 365 * 86400),
    serial=st.integers(min_value=1, max_value=2**159 - 1),
    usages=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
)
def test_fast_leaf_is_the_builders_leaf(
    ca: KeyType,
    key: int,
    uris: list[str],
    dns: list[str],
    ips: list[str],
    not_before: datetime,
    lifetime: int,
    serial: int,
    usages: tuple[bool, bool],
) -> None:
    ca_key, ca_cert = CAS[ca]
    template = _LeafTemplate(ca_cert, ca_key, *usages)
    spec = LeafSpec(
        not_before=not_before,
        not_after=not_before + timedelta(seconds=lifetime),
        uris=uris or ["spiffe://cluster.local/ns/a/sa/b"],
        dns_names=dns,
        ip_addresses=ips,
        server_auth=usages[0],
        client_auth=usages[1],
    )
    fast = template.sign(LEAF_KEYS[key], spec, ca_key, serial)
    slow = template._build(LEAF_KEYS[key], spec, ca_key, serial)
    assert fast.tbs_certificate_bytes == slow.tbs_certificate_bytes
    assert fast.signature_algorithm_oid == slow.signature_algorithm_oid
    # The signature is the CA's over exactly these bytes.
    public = ca_cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(fast.signature, fast.tbs_certificate_bytes, ec.ECDSA(signature_hash(ca_key)))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(fast.signature, fast.tbs_certificate_bytes, padding.PKCS1v15(), signature_hash(ca_key))
    fast.verify_directly_issued_by(ca_cert)


def test_names_the_builder_refuses_still_reach_the_builder() -> None:
    ca_key, ca_cert = CAS[KeyType.EC_P256]
    template = _LeafTemplate(ca_cert, ca_key, True, True)
    now = datetime.now(UTC)
    spec = LeafSpec(not_before=now, not_after=now + timedelta(hours=1), uris=["spiffe://cluster.local/ns/ä/sa/b"])
    with pytest.raises(ValueError, match="A-label"):
        template.sign(LEAF_KEYS[0], spec, ca_key, 7)


@pytest.mark.parametrize(
    ("not_before", "not_after", "match"),
    [
        (datetime(2030, 1, 2, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC), "after"),
        (datetime(1949, 12, 31, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC), "1950"),
    ],
)
def test_validity_the_builder_refuses_is_still_refused(not_before: datetime, not_after: datetime, match: str) -> None:
    ca_key, ca_cert = CAS[KeyType.EC_P256]
    template = _LeafTemplate(ca_cert, ca_key, True, True)
    spec = LeafSpec(not_before=not_before, not_after=not_after, uris=["spiffe://cluster.local/ns/a/sa/b"])
    with pytest.raises(ValueError, match=match):
        template.sign(LEAF_KEYS[0], spec, ca_key, 7)


def test_der_primitives() -> None:
    assert der.integer(0) == b"\x02\x01\x00"
    assert der.integer(127) == b"\x02\x01\x7f"
    assert der.integer(128) == b"\x02\x02\x00\x80"
    assert der.integer(256) == b"\x02\x02\x01\x00"
    long = der.tlv(0x04, b"x" * 300)
    assert long[:4] == b"\x04\x82\x01\x2c"
    assert der.children(der.sequence(long, der.integer(5))) == [long, der.integer(5)]
    with pytest.raises(ValueError, match="truncated"):
        der.children(b"\x30\x05\x02\x01")
    with pytest.raises(ValueError, match="negative"):
        der.integer(-1)
    assert der.x509_time(datetime(2049, 12, 31, 23, 59, 59)) == b"\x17\x0d491231235959Z"
    assert der.x509_time(datetime(2050, 1, 1)) == b"\x18\x0f20500101000000Z"
