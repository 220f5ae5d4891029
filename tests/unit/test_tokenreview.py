"""TokenReview authenticator with an in-memory reviewer: checks, cache, coalescing, error mapping."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from csr_service.common.errors import AuthenticationError, ResourceExhaustedError, UnavailableError
from csr_service.common.request import RequestContext
from csr_service.pipeline.authn.tokenreview import (
    POD_NAME_KEY,
    POD_UID_KEY,
    ReviewResult,
    TokenReviewAuthenticator,
    _api_error,
    _result_from_json,
    unverified_exp,
)
from csr_service.plugins.authenticator import Caller
from tests.support.waiting import wait_for_async

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def jwt_like(exp: float | None = NOW + 3600, name: str = "t") -> str:
    """A token-shaped string; only the (unverified) payload matters to the authenticator."""
    payload: dict[str, Any] = {"sub": name}
    if exp is not None:
        payload["exp"] = exp
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


def ok(ns: str = "default", sa: str = "sleep", audiences: tuple[str, ...] = ("istio-ca",)) -> ReviewResult:
    return ReviewResult(
        authenticated=True,
        username=f"system:serviceaccount:{ns}:{sa}",
        groups=("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"),
        extra={POD_NAME_KEY: ["sleep-1"], POD_UID_KEY: ["uid-1"]},
        audiences=audiences,
    )


class FakeReviewer:
    """Answers from ``answer(token)``; optionally waits on ``gate`` first (to hold calls in flight)."""

    def __init__(self, answer: Callable[[str], ReviewResult] | ReviewResult | Exception | None = None) -> None:
        self.answer = answer if answer is not None else ok()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.gate: asyncio.Event | None = None

    async def review(self, token: str, audiences: Sequence[str]) -> ReviewResult:
        self.calls.append((token, tuple(audiences)))
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(token) if callable(self.answer) else self.answer


def make(reviewer: FakeReviewer, clock: Clock | None = None, **kw: Any) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(reviewer, trust_domain="cluster.local", clock=clock or Clock(), **kw)


def ctx(token: str | None) -> RequestContext:
    return RequestContext(metadata={"authorization": f"Bearer {token}"} if token is not None else {})


def run(authn: TokenReviewAuthenticator, token: str | None) -> Caller:
    return asyncio.run(authn.authenticate(ctx(token)))


def test_accepted_token_maps_to_identity_with_pod_and_expiry() -> None:
    reviewer = FakeReviewer()
    caller = run(make(reviewer), jwt_like())
    assert caller.identity.uri == "spiffe://cluster.local/ns/default/sa/sleep"
    assert (caller.pod_name, caller.pod_uid) == ("sleep-1", "uid-1")
    assert caller.token_expires_at == datetime.fromtimestamp(NOW + 3600, UTC)
    assert caller.authenticator == "tokenreview"
    assert reviewer.calls == [(jwt_like(), ("istio-ca",))]


def test_configured_audiences_are_sent_and_required() -> None:
    reviewer = FakeReviewer(ok(audiences=("my-mesh",)))
    authn = make(reviewer, audiences=("my-mesh", "istio-ca"))
    assert run(authn, jwt_like()).identity.service_account == "sleep"
    assert reviewer.calls[0][1] == ("my-mesh", "istio-ca")


REJECTED = {
    "not authenticated": (ReviewResult(authenticated=False, error="token has been invalidated"), "not accepted"),
    # Empty status.audiences: the token is only valid for the apiserver itself.
    "apiserver audience only": (ok(audiences=()), "audience"),
    "other audience": (ok(audiences=("vault",)), "audience"),
    "not a service account group": (
        ReviewResult(
            authenticated=True,
            username="system:serviceaccount:a:b",
            groups=("system:authenticated",),
            audiences=("istio-ca",),
        ),
        "service-account",
    ),
    "user, not a service account": (
        ReviewResult(authenticated=True, username="alice", groups=("system:serviceaccounts",), audiences=("istio-ca",)),
        "service-account",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected_reviews_are_unauthenticated(case: str) -> None:
    result, fragment = REJECTED[case]
    with pytest.raises(AuthenticationError) as info:
        run(make(FakeReviewer(result)), jwt_like())
    assert fragment in info.value.public


@pytest.mark.parametrize("token", [None, "", "x" * 20000])
def test_missing_or_huge_token_never_reaches_the_api(token: str | None) -> None:
    reviewer = FakeReviewer()
    with pytest.raises(AuthenticationError):
        run(make(reviewer), token)
    assert reviewer.calls == []


def test_cache_hit_makes_no_second_call() -> None:
    reviewer = FakeReviewer()
    authn = make(reviewer)

    async def twice() -> None:
        await authn.authenticate(ctx(jwt_like()))
        await authn.authenticate(ctx(jwt_like()))

    asyncio.run(twice())
    assert len(reviewer.calls) == 1
    assert (authn.stats["hits"], authn.stats["misses"], authn.stats["coalesced"]) == (1, 1, 0)
    assert authn.cache_stats() == (1, 1)


def _call_n(authn: TokenReviewAuthenticator, clock: Clock, steps: list[tuple[float, str]]) -> None:
    async def go() -> None:
        for at, token in steps:
            clock.now = NOW + at
            await authn.authenticate(ctx(token))

    asyncio.run(go())


def test_entry_lives_until_the_token_expires_when_that_is_sooner() -> None:
    clock, reviewer = Clock(), FakeReviewer()
    authn = make(reviewer, clock, cache_ttl=timedelta(minutes=5))
    token = jwt_like(exp=NOW + 60)
    _call_n(authn, clock, [(0, token), (59, token)])
    assert len(reviewer.calls) == 1
    # Past exp the entry is gone; the apiserver now says no (a fake that follows exp).
    reviewer.answer = ReviewResult(authenticated=False, error="expired")
    with pytest.raises(AuthenticationError):
        _call_n(authn, clock, [(61, token)])
    assert len(reviewer.calls) == 2


def test_entry_lives_at_most_the_configured_ttl() -> None:
    clock, reviewer = Clock(), FakeReviewer()
    authn = make(reviewer, clock, cache_ttl=timedelta(minutes=5))
    token = jwt_like(exp=NOW + 12 * 3600)
    _call_n(authn, clock, [(0, token), (299, token), (301, token)])
    assert len(reviewer.calls) == 2


# 10**400: an integer no float can hold (float() of it raised OverflowError; found by fuzzing).
@pytest.mark.parametrize("exp", [None, float("nan"), float("inf"), 1e30, pytest.param(10**400, id="10^400")])
def test_token_without_a_sane_exp_is_cached_for_the_ttl(exp: float | None) -> None:
    # The apiserver accepted it (an OIDC issuer might sign anything): no crash, no eternal entry.
    clock, reviewer = Clock(), FakeReviewer()
    authn = make(reviewer, clock, cache_ttl=timedelta(seconds=30))
    token = jwt_like(exp=exp)
    assert run(authn, token).token_expires_at is None
    _call_n(authn, clock, [(29, token), (31, token)])
    assert len(reviewer.calls) == 2


def test_token_with_a_deeply_nested_payload_is_accepted_without_expiry() -> None:
    # json.loads raised RecursionError about a thousand levels down, out of authenticate (found
    # by fuzzing); the payload is only read for its exp, which this one does not have.
    token = "a." + base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode() + ".c"
    assert run(make(FakeReviewer()), token).token_expires_at is None


def test_cache_is_a_bounded_lru() -> None:
    clock, reviewer = Clock(), FakeReviewer()
    authn = make(reviewer, clock, cache_size=2)
    a, b, c = (jwt_like(name=n) for n in "abc")
    # a, b cached; touching a makes b the least recently used, so c evicts b.
    _call_n(authn, clock, [(0, a), (0, b), (0, a), (0, c)])
    assert authn.cache_len() == 2
    assert authn.stats["evictions"] == 1
    _call_n(authn, clock, [(0, a), (0, b)])
    assert [t for t, _ in reviewer.calls] == [a, b, c, b]


def test_zero_ttl_disables_the_cache() -> None:
    clock, reviewer = Clock(), FakeReviewer()
    authn = make(reviewer, clock, cache_ttl=timedelta(0))
    _call_n(authn, clock, [(0, jwt_like()), (0, jwt_like())])
    assert len(reviewer.calls) == 2
    assert authn.cache_len() == 0


def test_rejections_are_cached_only_briefly() -> None:
    clock = Clock()
    reviewer = FakeReviewer(ReviewResult(authenticated=False, error="service account deleted"))
    authn = make(reviewer, clock)
    token = jwt_like()

    async def attempt(at: float) -> None:
        clock.now = NOW + at
        with pytest.raises(AuthenticationError, match="not authenticated: service account deleted"):
            await authn.authenticate(ctx(token))

    async def go() -> None:
        for at in (0, 5, 9, 11):
            await attempt(at)

    asyncio.run(go())
    assert len(reviewer.calls) == 2  # at 0 and at 11 (the 10 s negative entry expired)
    assert authn.stats["rejected"] == 2


def test_concurrent_identical_reviews_share_one_call() -> None:
    reviewer = FakeReviewer()
    authn = make(reviewer)

    async def go() -> list[Caller]:
        reviewer.gate = asyncio.Event()
        tasks = [asyncio.create_task(authn.authenticate(ctx(jwt_like()))) for _ in range(10)]
        await wait_for_async(lambda: authn.stats["coalesced"] == 9, timeout=5, what="nine callers joining the review")
        reviewer.gate.set()
        return await asyncio.gather(*tasks)

    callers = asyncio.run(go())
    assert len(reviewer.calls) == 1
    assert {c.identity.uri for c in callers} == {"spiffe://cluster.local/ns/default/sa/sleep"}
    assert (authn.stats["misses"], authn.stats["coalesced"]) == (1, 9)


def test_a_cancelled_caller_does_not_cancel_the_shared_review() -> None:
    reviewer = FakeReviewer()
    authn = make(reviewer)

    async def go() -> Caller:
        reviewer.gate = asyncio.Event()
        first = asyncio.create_task(authn.authenticate(ctx(jwt_like())))
        second = asyncio.create_task(authn.authenticate(ctx(jwt_like())))
        await wait_for_async(lambda: authn.stats["coalesced"] == 1, timeout=5, what="the second caller joining")
        first.cancel()  # e.g. its request deadline passed
        reviewer.gate.set()
        return await second

    assert asyncio.run(go()).identity.service_account == "sleep"
    assert len(reviewer.calls) == 1


def test_api_errors_are_unavailable_not_cached_and_shared_as_fresh_exceptions() -> None:
    reviewer = FakeReviewer(UnavailableError("down", detail="connection refused"))
    authn = make(reviewer)

    async def go() -> list[BaseException]:
        reviewer.gate = asyncio.Event()
        tasks = [asyncio.create_task(authn.authenticate(ctx(jwt_like()))) for _ in range(3)]
        await wait_for_async(lambda: authn.stats["coalesced"] == 2, timeout=5, what="two callers joining the review")
        reviewer.gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    errors = asyncio.run(go())
    assert all(isinstance(e, UnavailableError) for e in errors)
    assert len({id(e) for e in errors}) == 3
    assert authn.stats["api_errors"] == 1
    reviewer.answer = ok()
    assert run(authn, jwt_like()).identity.namespace == "default"  # not remembered as a failure
    assert len(reviewer.calls) == 2


class _ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@pytest.mark.parametrize(
    ("exc", "kind", "fragment"),
    [
        (_ApiError(429, "Too Many Requests"), ResourceExhaustedError, "429"),
        (_ApiError(403, "Forbidden"), UnavailableError, "tokenreviews.authentication.k8s.io"),
        (_ApiError(403, "Forbidden"), UnavailableError, "unless the apiserver has just started"),
        (_ApiError(500, "Internal Server Error"), UnavailableError, "500"),
        (ConnectionRefusedError("refused"), UnavailableError, "ConnectionRefusedError"),
    ],
)
def test_api_error_mapping(exc: Exception, kind: type, fragment: str) -> None:
    error = _api_error(exc)
    assert type(error) is kind
    assert fragment in error.detail


@pytest.mark.parametrize(
    ("token", "exp"),
    [
        (jwt_like(exp=NOW), NOW),
        (jwt_like(exp=None), None),
        ("not-a-jwt", None),
        ("a.!!!.c", None),
        ("a." + base64.urlsafe_b64encode(b'{"exp": true}').decode() + ".c", None),
        ("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c", None),
        # Not sane dates: used as they are, they broke the cache lifetime and the expiry's date.
        *(
            ("a." + base64.urlsafe_b64encode(b'{"exp": ' + raw + b"}").decode() + ".c", None)
            for raw in (b"NaN", b"Infinity", b"-Infinity", b"1e30", b"253402300800", b"null", b"-5", b"1" + b"0" * 400)
        ),
        # Found by fuzzing: nested deeper than json's recursion limit (RecursionError escaped).
        ("a." + base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode() + ".c", None),
        ("a." + base64.urlsafe_b64encode(b'{"exp": ' + b"[" * 5000 + b"]" * 5000 + b"}").decode() + ".c", None),
    ],
)
def test_unverified_exp(token: str, exp: float | None) -> None:
    assert unverified_exp(token) == exp


def test_review_json_from_the_event_loop_path() -> None:
    status = {
        "authenticated": True,
        "user": {
            "username": "system:serviceaccount:ns:sa",
            "uid": "u",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"],
            "extra": {POD_NAME_KEY: ["p"], POD_UID_KEY: ["1"]},
        },
        "audiences": ["istio-ca"],
    }

    assert _result_from_json(status) == ReviewResult(
        authenticated=True,
        username="system:serviceaccount:ns:sa",
        groups=("system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"),
        extra={POD_NAME_KEY: ["p"], POD_UID_KEY: ["1"]},
        audiences=("istio-ca",),
    )
    assert _result_from_json({"authenticated": False, "error": "invalid bearer token"}) == ReviewResult(
        authenticated=False, error="invalid bearer token"
    )


@pytest.mark.parametrize(
    "status",
    [
        {"authenticated": "yes", "user": {"username": "system:serviceaccount:ns:sa"}},
        {"authenticated": True, "user": "system:serviceaccount:ns:sa"},
        {"authenticated": True, "user": {"username": ["x"], "groups": "system:serviceaccounts"}},
    ],
)
def test_ill_typed_review_json_reads_as_absent_fields(status: dict[str, Any]) -> None:
    result = _result_from_json(status)
    assert result.username == "" or result.groups == ()
    with pytest.raises(AuthenticationError):
        run(make(FakeReviewer(result)), jwt_like())


def test_review_json_without_status_is_unavailable() -> None:
    with pytest.raises(UnavailableError):
        _result_from_json(None)
