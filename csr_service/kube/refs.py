"""References to Kubernetes objects as operators write them in flags: ``ns/name[:key]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from csr_service.common.errors import ConfigError

__all__ = ["DNS1123", "ObjectRef", "parse_object_ref"]

#: A DNS-1123 subdomain: what namespaces and most object names must be.
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """A namespaced object, optionally one key of its data (``ns/name[:key]``)."""

    namespace: str
    name: str
    key: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" + (f":{self.key}" if self.key else "")


def parse_object_ref(text: str, flag: str, *, with_key: bool = False, default_key: str = "") -> ObjectRef:
    """Parse ``ns/name`` (or ``ns/name[:key]`` with ``with_key``); ConfigError naming ``flag``."""
    ref, _, key = text.partition(":") if with_key else (text, "", "")
    ns, sep, name = ref.partition("/")
    if not sep or not DNS1123.fullmatch(ns) or not DNS1123.fullmatch(name):
        form = "NS/NAME[:KEY]" if with_key else "NS/NAME"
        raise ConfigError(f"--{flag}: expected {form}, got {text!r}")
    return ObjectRef(ns, name, key or default_key)
