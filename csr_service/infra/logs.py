"""Logging setup: text or JSON, one line per record, the request id on every line about a request.

One record is one line whatever its text holds. Messages carry backend- and client-supplied
text (cert-manager's multi-line Vault errors, names from a CSR, a header value), and a
newline in it would start a line that looks like a record of its own, without the request
id: confusing at best, forged log lines at worst. The text format therefore escapes line
breaks and other control characters (``\\n``, ``\\x1b``, ...), tracebacks included; the JSON
format gets the same from ``json.dumps``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from csr_service.common.request import REQUEST_ID

__all__ = ["escape_controls", "setup_logging"]

#: C0 controls, DEL, C1 controls (NEL among them) and the Unicode line/paragraph separators:
#: everything a terminal or a log shipper may take as a line break or a control sequence.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPES = str.maketrans({chr(c): _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS})


def escape_controls(text: str) -> str:
    """``text`` on one line: line breaks and control characters written as escapes."""
    return text.translate(_ESCAPES)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            doc["request_id"] = rid
        if self._worker is not None:
            doc["worker"] = self._worker
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _TextFormatter(logging.Formatter):
    """The classic text line, escaped so that a record never spans several lines."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def setup_logging(level: str = "info", fmt: str = "text", *, worker: int | None = None) -> None:
    """Configure the root logger once (idempotent).

    ``worker``: the worker process index when there are several (a ``worker`` field in JSON).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
