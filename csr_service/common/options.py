"""Declaring options once: each becomes a flag, an environment variable and a config-file key.

``--max-certificate-duration 2h``, ``CSR_SERVICE_MAX_CERTIFICATE_DURATION=2h`` and
``max-certificate-duration = "2h"`` in the TOML file given by ``--config`` are the same
setting. Precedence: flag > environment > config file > default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from csr_service.common.durations import format_duration, parse_duration

__all__ = ["ENV_PREFIX", "Option", "parse_bool", "parse_list"]

ENV_PREFIX = "CSR_SERVICE_"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_list(text: str) -> tuple[str, ...]:
    """Comma-separated list; blanks dropped."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _parse_duration(text: str) -> timedelta:
    return parse_duration(text)


@dataclass(frozen=True, slots=True)
class Option:
    """One setting. ``parse`` turns the string form (flag/env/file) into the typed value."""

    name: str
    help: str
    default: Any
    group: str = "general"
    kind: str = "str"  # str | bool | int | float | list | duration | path
    secret: bool = False
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def parse(self, raw: Any) -> Any:
        """Convert a raw value (string from flag/env, or TOML-typed) to this option's type."""
        parser: Mapping[str, Callable[[str], Any]] = {
            "str": str,
            "path": str,
            "bool": parse_bool,
            "int": int,
            "float": float,
            "list": parse_list,
            "duration": _parse_duration,
        }
        if self.kind == "bool" and isinstance(raw, bool):
            return raw
        if self.kind == "int" and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if self.kind == "float" and isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if self.kind == "list" and isinstance(raw, list | tuple):
            return tuple(str(x) for x in raw)
        if not isinstance(raw, str):
            raw = str(raw)
        return parser[self.kind](raw)

    def describe_default(self) -> str:
        d = self.default
        if isinstance(d, timedelta):
            return format_duration(d)
        if isinstance(d, tuple):
            return ",".join(d) or '""'
        if d is None or d == "":
            return '""'
        return str(d).lower() if isinstance(d, bool) else str(d)
