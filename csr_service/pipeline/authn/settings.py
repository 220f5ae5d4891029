"""Validated, frozen settings of the built-in authenticators, built from their option values.

Each plugin's ``validator`` is its settings' ``from_values`` (run while the configuration is
validated, so ``serve`` fails at start-up naming the flag) and its factory builds the
authenticator from the same settings. No file or network access here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.common.errors import ConfigError

__all__ = ["JWKSSettings", "JWTSettings", "TokenReviewSettings"]


def _audiences(values: Mapping[str, Any]) -> tuple[str, ...]:
    audiences = tuple(values["token-audiences"])
    if not audiences:
        raise ConfigError("--token-audiences: at least one audience is required")
    return audiences


@dataclass(frozen=True, slots=True)
class JWTSettings:
    """``--authenticator jwt``: keys from a JWKS file."""

    audiences: tuple[str, ...]
    jwks_file: str | None
    issuer: str | None
    leeway: timedelta

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> JWTSettings:
        return cls(
            audiences=_audiences(values),
            jwks_file=values["jwt-jwks-file"] or None,
            issuer=values["jwt-issuer"] or None,
            leeway=values["jwt-leeway"],
        )


@dataclass(frozen=True, slots=True)
class TokenReviewSettings:
    """``--authenticator tokenreview``: the apiserver reviews each token (cached)."""

    audiences: tuple[str, ...]
    cache_ttl: timedelta
    cache_size: int

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TokenReviewSettings:
        if values["tokenreview-cache-size"] < 1:
            raise ConfigError("--tokenreview-cache-size: must be >= 1")
        if values["tokenreview-cache-ttl"] < timedelta(0):
            raise ConfigError("--tokenreview-cache-ttl: must be >= 0 (0 disables the cache)")
        return cls(
            audiences=_audiences(values),
            cache_ttl=values["tokenreview-cache-ttl"],
            cache_size=values["tokenreview-cache-size"],
        )


@dataclass(frozen=True, slots=True)
class JWKSSettings:
    """``--authenticator jwks``: the apiserver's (or an OIDC issuer's) published keys."""

    audiences: tuple[str, ...]
    url: str | None
    ca_file: str | None
    refresh_interval: timedelta
    issuer: str | None
    leeway: timedelta

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> JWKSSettings:
        if values["jwks-refresh-interval"] < timedelta(seconds=10):
            raise ConfigError("--jwks-refresh-interval: must be at least 10s")
        return cls(
            audiences=_audiences(values),
            url=values["jwks-url"] or None,
            ca_file=values["jwks-ca-file"] or None,
            refresh_interval=values["jwks-refresh-interval"],
            issuer=values["jwt-issuer"] or None,
            leeway=values["jwt-leeway"],
        )
