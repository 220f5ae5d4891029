"""An issuer written against csr-service's public plugin surface only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from csr_service.common.errors import ConfigError, FailedPreconditionError
from csr_service.pki.certs import CLOCK_SKEW, LeafSpec, build_leaf
from csr_service.pki.pem import load_private_key, parse_certs
from csr_service.plugins.issuer import IssuedChain, SigningRequest
from csr_service.plugins.runtime import Runtime


def validate(values: Mapping[str, Any]) -> None:
    if values["example-max-ttl"] < timedelta(minutes=10):
        raise ConfigError("--example-max-ttl: must be at least 10m")


class ExampleIssuer:
    name = "example"
    roots_are_configuration = True  # the operator's own files

    def __init__(self, directory: Path, max_ttl: timedelta) -> None:
        self._dir = directory
        self._max_ttl = max_ttl
        self.started = False

    async def start(self) -> None:
        try:
            self._cert = parse_certs((self._dir / "ca-cert.pem").read_bytes())[0]
            self._key = load_private_key((self._dir / "ca-key.pem").read_bytes())
            self._roots = parse_certs((self._dir / "root-cert.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise FailedPreconditionError("the example CA cannot be loaded", detail=str(exc)) from exc
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def roots(self) -> Sequence[x509.Certificate]:
        return self._roots

    async def sign(self, request: SigningRequest) -> IssuedChain:
        if not self.started:
            raise FailedPreconditionError("the example issuer is not started")
        now = datetime.now(UTC)
        spec = LeafSpec(
            not_before=now - CLOCK_SKEW,
            not_after=now + min(request.ttl, self._max_ttl),
            uris=request.uris,
            dns_names=request.dns_names,
            ip_addresses=request.ip_addresses,
        )
        leaf = build_leaf(request.public_key(), spec, self._cert, self._key)  # type: ignore[arg-type]
        return IssuedChain(leaf=leaf, chain=(self._cert,))


def create(values: Mapping[str, Any], runtime: Runtime) -> ExampleIssuer:
    if not values["example-ca-dir"]:
        raise ConfigError("--example-ca-dir: required with --issuer example")
    return ExampleIssuer(Path(values["example-ca-dir"]), values["example-max-ttl"])
