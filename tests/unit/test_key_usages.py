"""Key usages of issued leaves: what Istio's own CA puts in, required of every issuer's output.

A backend decides usages on its own (cert-manager's Vault issuer ignores ``spec.usages``; the
Vault role alone decides), so the pipeline checks them after signing: a leaf without them is
FAILED_PRECONDITION naming the issuer and the usage, counted as that issuer's error, and
never reaches the workload. csr-service's own TLS certificates need only the server side.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import REGISTRY

from csr_service.common.errors import FailedPreconditionError
from csr_service.pipeline.own_cert import issue_own_certificate
from csr_service.pipeline.verify import missing_usages
from csr_service.pki.keys import KeyType
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from tests.support import pki
from tests.support.certs import WORKLOAD, csr_pem
from tests.support.pipeline import ctx, make_pipeline
from tests.support.pki import KeyKind, KeyPair, leaf_with_usages, new_key

SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
CA = pki.make_ca("usage test root")


# What each misconfiguration leaves out, and how the refusal names it.
MISSING = {
    "no-server-auth": ({"ekus": (CLIENT,)}, "ExtKeyUsage serverAuth"),
    "no-client-auth": ({"ekus": (SERVER,)}, "ExtKeyUsage clientAuth"),
    "no-eku-extension": ({"ekus": None}, "ExtKeyUsage serverAuth"),
    "no-digital-signature": ({"digital_signature": False}, "KeyUsage digitalSignature"),
    "no-ku-extension": ({"key_usage": False}, "KeyUsage digitalSignature"),
    "ca-true": ({"ca_flag": True}, "BasicConstraints CA:FALSE"),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_each_missing_usage_is_named(case: str) -> None:
    overrides, named = MISSING[case]
    leaf = leaf_with_usages(CA, new_key().public_key(), **overrides)
    assert any(m.startswith(named) for m in missing_usages(leaf)), missing_usages(leaf)


def test_istio_shaped_leaves_pass_for_every_key_type() -> None:
    for kind in ("ec256", "ec384", "rsa"):
        assert missing_usages(pki.sign_leaf(CA, new_key(kind).public_key(), uris=(WORKLOAD,))) == []


def test_key_encipherment_is_required_of_rsa_leaves_only() -> None:
    rsa_leaf = leaf_with_usages(CA, new_key("rsa").public_key(), key_encipherment=False)
    ec_leaf = leaf_with_usages(CA, new_key("ec256").public_key(), key_encipherment=False)
    assert missing_usages(rsa_leaf) == ["KeyUsage keyEncipherment (RSA key)"]
    assert missing_usages(ec_leaf) == []


def test_a_missing_basic_constraints_is_not_a_ca() -> None:
    """RFC 5280: without BasicConstraints a certificate is not a CA (Vault's default role)."""
    assert missing_usages(leaf_with_usages(CA, new_key().public_key(), ca_flag=None)) == []


def test_the_vault_role_of_the_issue() -> None:
    """server_flag=false, key_usage=DigitalSignature, RSA key: clientAuth only, no KeyEncipherment."""
    leaf = leaf_with_usages(CA, new_key("rsa").public_key(), key_encipherment=False, ekus=(CLIENT,))
    assert missing_usages(leaf) == ["KeyUsage keyEncipherment (RSA key)", "ExtKeyUsage serverAuth"]


@pytest.mark.parametrize("purpose", ["serving", "istiod"])
def test_own_tls_certificates_need_the_server_side_only(purpose: str) -> None:
    key = new_key("rsa").public_key()
    server_only = leaf_with_usages(CA, key, uris=(), dns=("x.svc",), ekus=(SERVER,), key_encipherment=False)
    assert missing_usages(server_only, purpose) == []
    client_only = leaf_with_usages(CA, key, uris=(), dns=("x.svc",), ekus=(CLIENT,))
    assert missing_usages(client_only, purpose) == ["ExtKeyUsage serverAuth"]


# ---------------------------------------------------------------- through the pipeline
class _UsageIssuer:
    """Signs with the local CA's key like a backend whose configuration drops usages."""

    name = "usage-test"

    def __init__(self, inner: Any, key_kind: KeyKind = "ec256", **overrides: Any) -> None:
        self.inner, self.overrides = inner, overrides

    async def sign(self, request: SigningRequest) -> IssuedChain:
        m = self.inner.material
        ca = KeyPair(m.cert, m.key)
        not_after = dt.datetime.now(dt.UTC) + request.ttl
        leaf = leaf_with_usages(
            ca, request.public_key(), uris=request.uris, dns=request.dns_names, not_after=not_after, **self.overrides
        )
        return IssuedChain(leaf=leaf, chain=(m.cert,))


def _errors(issuer: str, code: str) -> float:
    value = REGISTRY.get_sample_value("csr_service_issuer_sign_errors_total", {"issuer": issuer, "code": code})
    return value or 0.0


@pytest.mark.parametrize("case", list(MISSING))
@pytest.mark.parametrize("key_kind", ["ec256", "rsa"])
def test_pipeline_refuses_and_counts_a_leaf_without_a_usage(tmp_path: Path, case: str, key_kind: KeyKind) -> None:
    overrides, named = MISSING[case]
    before = _errors("usage-test", "FAILED_PRECONDITION")

    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path / "ca")
        kit.pipeline.issuers.current = _UsageIssuer(kit.issuer, **overrides)
        return await kit.pipeline.create_certificate(csr_pem(new_key(key_kind)).decode(), 0, {}, ctx())

    with pytest.raises(FailedPreconditionError) as refused:
        asyncio.run(scenario())
    assert "issuer usage-test" in refused.value.public
    assert named in refused.value.public
    assert "-----BEGIN" not in refused.value.public + refused.value.detail  # the leaf is never handed out
    assert _errors("usage-test", "FAILED_PRECONDITION") == before + 1


def test_pipeline_refuses_the_rsa_leaf_without_key_encipherment(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path / "ca")
        kit.pipeline.issuers.current = _UsageIssuer(kit.issuer, key_encipherment=False)
        return await kit.pipeline.create_certificate(csr_pem(new_key("rsa")).decode(), 0, {}, ctx())

    with pytest.raises(FailedPreconditionError, match="keyEncipherment"):
        asyncio.run(scenario())


@pytest.mark.parametrize("key_kind", ["ec256", "ec384", "rsa"])
def test_local_ca_leaves_pass(tmp_path: Path, key_kind: KeyKind) -> None:
    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path / "ca")
        return await kit.pipeline.create_certificate(csr_pem(new_key(key_kind)).decode(), 0, {}, ctx())

    leaf = pki.load_certs(asyncio.run(scenario())[0])[0]
    assert missing_usages(leaf) == []


def _own(issuer: Any, purpose: str) -> object:
    return asyncio.run(
        issue_own_certificate(
            issuer,
            [issuer.inner.material.cert],
            ttl=dt.timedelta(minutes=30),
            key_type=KeyType.RSA2048,
            purpose=purpose,
            request_id="r1",
            dns_names=("csr-service.test",),
        )
    )


@pytest.mark.parametrize("purpose", ["serving", "istiod"])
def test_own_certificates_are_checked_for_the_server_side(tmp_path: Path, purpose: str) -> None:
    async def local() -> Any:
        return (await make_pipeline(tmp_path / "ca")).issuer

    inner = asyncio.run(local())
    assert _own(_UsageIssuer(inner, ekus=(SERVER,), key_encipherment=False), purpose)
    with pytest.raises(FailedPreconditionError, match=f"issuer usage-test returned a {purpose} .*serverAuth"):
        _own(_UsageIssuer(inner, ekus=(CLIENT,)), purpose)
