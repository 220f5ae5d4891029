"""Driving an issuer directly in tests: a signing request, and start → body → close in one loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from cryptography import x509

from csr_service.common.lifecycle import Lifecycle
from csr_service.plugins.issuer import Issuer, SigningRequest
from tests.support.certs import WORKLOAD, csr_pem
from tests.support.pki import KeyKind, new_key

__all__ = ["run_fresh", "run_issuer", "signing_request", "with_started"]

IssuerT = TypeVar("IssuerT", bound=Issuer)
T = TypeVar("T")


def signing_request(
    uri: str = WORKLOAD,
    *,
    key_kind: KeyKind = "ec256",
    ttl: timedelta = timedelta(minutes=30),
    uris: Sequence[str] | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    **kw: Any,
) -> SigningRequest:
    """A request for a fresh key; the CSR carries the same names as the request (``uris``
    defaults to ``(uri,)``), as a workload's or the serving certificate's CSR does."""
    names = tuple((uri,) if uris is None else uris)
    pem = csr_pem(new_key(key_kind), uris=names, dns_names=tuple(dns_names), ip_addresses=tuple(ip_addresses))
    return SigningRequest(
        csr=x509.load_pem_x509_csr(pem),
        csr_pem=pem,
        ttl=ttl,
        uris=names,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
        **kw,
    )


async def with_started(issuer: IssuerT, body: Callable[[IssuerT], Awaitable[T]]) -> T:
    """Start ``issuer`` (if it has a lifecycle), run ``body``, close it: the way the server uses it."""
    lifecycle = issuer if isinstance(issuer, Lifecycle) else None
    if lifecycle is not None:
        await lifecycle.start()
    try:
        return await body(issuer)
    finally:
        if lifecycle is not None:
            await lifecycle.stop()


def run_issuer(issuer: IssuerT, body: Callable[[IssuerT], Awaitable[T]]) -> T:
    """``asyncio.run`` of :func:`with_started`: one event loop per call, as in the server's workers."""
    return asyncio.run(with_started(issuer, body))


def run_fresh(factory: Callable[[], IssuerT], body: Callable[[IssuerT], Awaitable[T]]) -> T:
    """Like :func:`run_issuer`, but the issuer is built inside the event loop it will use."""

    async def main() -> T:
        return await with_started(factory(), body)

    return asyncio.run(main())
