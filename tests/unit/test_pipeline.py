"""The whole pipeline in-process: order of steps, response shape, verification of issuer output."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from csr_service.common.errors import (
    STATUS_TABLE,
    AuthenticationError,
    CSRServiceError,
    FailedPreconditionError,
    InternalError,
    InvalidRequestError,
    LoadShedError,
    PermissionDeniedError,
    UnavailableError,
    status_code_for,
)
from csr_service.pipeline.ratelimit import IdentityRateLimiter
from csr_service.pki.keys import KeyType, generate_key
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from tests.support import pki
from tests.support.certs import WORKLOAD, csr_pem, forge_signature, uri_sans
from tests.support.pipeline import ctx, make_pipeline, token
from tests.support.pki import load_certs, new_key


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _issue(
    tmp: Path, csr: bytes | str, seconds: int = 3600, md: dict[str, Any] | None = None, **kw: Any
) -> list[str]:
    kit = await make_pipeline(tmp, **kw)
    c = ctx(**kw.pop("ctx_md", {})) if "ctx_md" in kw else ctx()
    return await kit.pipeline.create_certificate(csr if isinstance(csr, str) else csr.decode(), seconds, md or {}, c)


def test_response_is_leaf_then_root_bundle(tmp_path: Path) -> None:
    chain = _run(_issue(tmp_path, csr_pem(new_key())))
    assert len(chain) == 2
    assert all(e.endswith("\n") for e in chain)
    leaf = load_certs(chain[0].encode())[0]
    assert uri_sans(leaf) == [WORKLOAD]
    root = load_certs(chain[1].encode())[0]
    assert leaf.issuer == root.subject


def test_intermediate_is_between_leaf_and_root(tmp_path: Path) -> None:
    chain = _run(_issue(tmp_path, csr_pem(new_key("rsa")), intermediate=True))
    assert len(chain) == 3
    leaf, inter, root = (load_certs(e.encode())[0] for e in chain)
    assert leaf.issuer == inter.subject
    assert inter.issuer == root.subject


def test_multi_root_bundle_is_last_element(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path)
        extra = pki.make_ca("next").cert
        kit.trust.update([*kit.trust.current.roots, extra])
        return await kit.pipeline.create_certificate(csr_pem(new_key()).decode(), 0, {}, ctx())

    chain = _run(scenario())
    assert len(load_certs(chain[-1].encode())) == 2


def test_ttl_is_clamped(tmp_path: Path) -> None:
    chain = _run(_issue(tmp_path, csr_pem(new_key()), seconds=86400 * 365))
    leaf = load_certs(chain[0].encode())[0]
    assert leaf.not_valid_after_utc <= datetime.now(UTC) + timedelta(hours=1, seconds=5)


def test_other_identity_is_unauthenticated(tmp_path: Path) -> None:
    csr = csr_pem(new_key(), uris=("spiffe://cluster.local/ns/default/sa/admin",))
    with pytest.raises(AuthenticationError):
        _run(_issue(tmp_path, csr))


def test_authentication_runs_before_csr_parsing(tmp_path: Path) -> None:
    async def scenario() -> None:
        kit = await make_pipeline(tmp_path)
        await kit.pipeline.create_certificate("garbage", 0, {}, ctx(tok="bad"))

    with pytest.raises(AuthenticationError):
        _run(scenario())


@pytest.mark.parametrize(("cluster", "ok"), [("", True), ("Kubernetes", True), ("other-cluster", False)])
def test_cluster_id(tmp_path: Path, cluster: str, ok: bool) -> None:
    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path)
        c = ctx(clusterid=cluster) if cluster else ctx()
        return await kit.pipeline.create_certificate(csr_pem(new_key()).decode(), 0, {}, c)

    if ok:
        assert _run(scenario())
    else:
        with pytest.raises(AuthenticationError, match="other-cluster"):
            _run(scenario())


def test_impersonation_is_refused_without_policy(tmp_path: Path) -> None:
    csr = csr_pem(new_key(), uris=("spiffe://cluster.local/ns/a/sa/b",))
    with pytest.raises(PermissionDeniedError, match="impersonat"):
        _run(_issue(tmp_path, csr, md={"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"}))


class _BadIssuer:
    """Wraps a real issuer and corrupts its output in one way."""

    name = "bad"

    def __init__(self, inner: Any, mode: str) -> None:
        self.inner, self.mode = inner, mode

    async def sign(self, request: SigningRequest) -> IssuedChain:
        if self.mode == "unavailable":
            raise UnavailableError("backend down", detail="connection refused")
        if self.mode == "longer":
            request = replace(request, ttl=request.ttl * 10)
        if self.mode == "other-name":
            request = replace(request, uris=("spiffe://cluster.local/ns/x/sa/y",))
        issued: IssuedChain = await self.inner.sign(request)
        if self.mode == "foreign-chain":
            return IssuedChain(leaf=issued.leaf, chain=[pki.make_ca("evil").cert])
        return issued


@pytest.mark.parametrize(
    ("mode", "error"),
    [("longer", InternalError), ("other-name", InternalError), ("unavailable", UnavailableError)],
)
def test_issuer_output_is_verified(tmp_path: Path, mode: str, error: type[CSRServiceError]) -> None:
    async def scenario() -> None:
        kit = await make_pipeline(tmp_path / "ca")
        kit.pipeline.issuers.current = _BadIssuer(kit.issuer, mode)
        await kit.pipeline.create_certificate(csr_pem(new_key()).decode(), 0, {}, ctx())

    with pytest.raises(error):
        _run(scenario())


def test_chain_not_reaching_trust_bundle_is_internal(tmp_path: Path) -> None:
    async def scenario() -> None:
        kit = await make_pipeline(tmp_path / "ca")
        other = pki.make_ca("other root").cert
        kit.trust.update([other])  # the bundle no longer contains the issuing root
        await kit.pipeline.create_certificate(csr_pem(new_key()).decode(), 0, {}, ctx())

    with pytest.raises(InternalError, match="trust bundle"):
        _run(scenario())


def test_verification_cache_notices_a_changed_bundle(tmp_path: Path) -> None:
    async def scenario() -> None:
        kit = await make_pipeline(tmp_path / "ca")
        csr = csr_pem(new_key()).decode()
        await kit.pipeline.create_certificate(csr, 0, {}, ctx())  # fills the cache
        kit.trust.update([pki.make_ca("other root").cert])
        await kit.pipeline.create_certificate(csr, 0, {}, ctx())

    with pytest.raises(InternalError):
        _run(scenario())


def test_non_string_impersonation_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        _run(_issue(tmp_path, csr_pem(new_key()), md={"ImpersonatedIdentity": True}))


def test_error_table_covers_every_error_class() -> None:
    classes = {c for c in CSRServiceError.__subclasses__()}
    assert classes == set(STATUS_TABLE)
    assert status_code_for(UnavailableError("x")) is grpc.StatusCode.UNAVAILABLE

    class Sub(UnavailableError):
        pass

    assert status_code_for(Sub("x")) is grpc.StatusCode.UNAVAILABLE


def test_token_helper_is_valid() -> None:
    assert x509
    assert token()


class _StampingIssuer:
    """Signs like a backend that does not backdate: NotBefore = its own clock + ``ahead``."""

    name = "stamping"

    def __init__(self, inner: Any, ahead: timedelta) -> None:
        self.inner, self.ahead = inner, ahead

    async def sign(self, request: SigningRequest) -> IssuedChain:
        m = self.inner.material
        start = datetime.now(UTC).replace(microsecond=0) + self.ahead
        leaf = pki.sign_leaf(
            pki.KeyPair(m.cert, m.key),
            request.csr.public_key(),
            uris=request.uris,
            not_before=start,
            not_after=start + request.ttl - self.ahead,
        )
        return IssuedChain(leaf=leaf, chain=(m.cert,))


@pytest.mark.parametrize(("ahead", "ok"), [(timedelta(seconds=1), True), (timedelta(minutes=10), False)])
def test_not_before_of_a_non_backdating_backend(tmp_path: Path, ahead: timedelta, ok: bool) -> None:
    async def scenario() -> list[str]:
        kit = await make_pipeline(tmp_path / "ca")
        kit.pipeline.issuers.current = _StampingIssuer(kit.issuer, ahead)
        return await kit.pipeline.create_certificate(csr_pem(new_key()).decode(), 0, {}, ctx())

    if ok:
        assert len(_run(scenario())) == 2
    else:
        with pytest.raises(InternalError, match="NotBefore"):
            _run(scenario())


class _BackendChecksSignature:
    """Wraps a real issuer like Vault's: claims to verify CSR signatures itself (contract item
    7) and refuses with FailedPreconditionError, as Vault's 400 maps; ``refuse_all`` refuses
    every CSR, as a misconfigured role does."""

    name = "pop-backend"
    checks_csr_signature = True

    def __init__(self, inner: Any, *, refuse_all: bool = False) -> None:
        self.inner, self.refuse_all, self.calls = inner, refuse_all, 0

    async def sign(self, request: SigningRequest) -> IssuedChain:
        self.calls += 1
        if self.refuse_all or not request.csr.is_signature_valid:
            raise FailedPreconditionError("the role refused it; check the role", detail="400 from the backend")
        issued: IssuedChain = await self.inner.sign(request)
        return issued


def _with_issuer(tmp: Path, wrap: Any, csr: bytes) -> tuple[Any, BaseException | None]:
    async def scenario() -> tuple[Any, BaseException | None]:
        kit = await make_pipeline(tmp / "ca")
        issuer = kit.pipeline.issuers.current = wrap(kit.issuer)
        try:
            await kit.pipeline.create_certificate(csr.decode(), 0, {}, ctx())
        except CSRServiceError as exc:
            return issuer, exc
        return issuer, None

    result: tuple[Any, BaseException | None] = _run(scenario())
    return result


def test_forged_csr_never_reaches_an_issuer_that_relies_on_the_pipeline(tmp_path: Path) -> None:
    class Counting(_BackendChecksSignature):
        checks_csr_signature = False

    issuer, error = _with_issuer(tmp_path, Counting, forge_signature(csr_pem(new_key())))
    assert isinstance(error, InvalidRequestError)
    assert "signature does not verify" in error.public
    assert issuer.calls == 0


def test_signature_is_left_to_a_backend_that_checks_it(tmp_path: Path) -> None:
    """A forged CSR reaches the backend once; its refusal becomes INVALID_ARGUMENT about the
    signature, not FAILED_PRECONDITION about the backend's configuration."""

    def sign_errors(label: str) -> float:
        return REGISTRY.get_sample_value("citadel_server_csr_sign_err_count_total", {"error": label}) or 0.0

    csr_errors, not_ready = sign_errors("CSR_ERROR"), sign_errors("CA_NOT_READY")
    issuer, error = _with_issuer(tmp_path, _BackendChecksSignature, forge_signature(csr_pem(new_key())))
    assert issuer.calls == 1
    assert isinstance(error, InvalidRequestError)
    assert error.public == "invalid CSR: signature does not verify"
    assert "the backend refused it too: 400 from the backend" in error.detail
    assert isinstance(error.__cause__, FailedPreconditionError)
    # Counted as Istio's CA counts a bad CSR, not as a CA that is not ready (what operators alert on).
    assert sign_errors("CSR_ERROR") == csr_errors + 1
    assert sign_errors("CA_NOT_READY") == not_ready


def test_a_backend_refusing_a_good_csr_is_still_failed_precondition(tmp_path: Path) -> None:
    issuer, error = _with_issuer(
        tmp_path, lambda inner: _BackendChecksSignature(inner, refuse_all=True), csr_pem(new_key("rsa"))
    )
    assert issuer.calls == 1
    assert isinstance(error, FailedPreconditionError)
    assert "check the role" in error.public


def test_a_backend_that_checks_signatures_signs_good_csrs(tmp_path: Path) -> None:
    issuer, error = _with_issuer(tmp_path, _BackendChecksSignature, csr_pem(new_key()))
    assert error is None
    assert issuer.calls == 1


def test_the_issuer_gets_the_csr_key_the_checks_parsed(tmp_path: Path) -> None:
    class Recording(_BackendChecksSignature):
        async def sign(self, request: SigningRequest) -> IssuedChain:
            self.seen = request.csr_public_key
            return await super().sign(request)

    key = new_key()
    issuer, error = _with_issuer(tmp_path, Recording, csr_pem(key))
    assert error is None
    assert issuer.seen == key.public_key()


def test_per_identity_rate_limit_runs_before_csr_parsing(tmp_path: Path) -> None:
    async def scenario() -> None:
        kit = await make_pipeline(tmp_path)
        kit.pipeline.rate_limit = IdentityRateLimiter(rate=0.001, burst=1)
        await kit.pipeline.create_certificate(csr_pem(generate_key(KeyType.EC_P256)).decode(), 0, {}, ctx())
        with pytest.raises(LoadShedError, match="over --per-identity-rate") as info:
            await kit.pipeline.create_certificate("garbage", 0, {}, ctx())  # refused before the CSR is read
        assert info.value.public == "too many requests for this identity; retry later"
        assert status_code_for(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = csr_pem(generate_key(KeyType.EC_P256), uris=("spiffe://cluster.local/ns/default/sa/other",))
        assert await kit.pipeline.create_certificate(other.decode(), 0, {}, ctx(tok=token(sa="other")))

    _run(scenario())
