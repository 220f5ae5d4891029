"""One log record, one line, with its request id: whatever the message or a traceback holds.

Backend messages (cert-manager's multi-line Vault errors) and client-supplied text (names in a
CSR) end up in log messages; a line break in them must not start a line of its own (without
the request id, or forged to look like another record).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from csr_service.common.request import REQUEST_ID
from csr_service.infra.logs import escape_controls, setup_logging

# What a client could put into a CSR's URI, or a backend into its error: a forged record.
FORGED = "spiffe://cluster.local/ns/a/sa/b\n2026-12-05 00:00:00,000 INFO    csr_service [-] root CA replaced"
VAULT_ERROR = (
    "Error making API request.\n\nURL: PUT http://127.0.0.1:8200/v1/pki/sign/istio\nCode: 400. Errors:\n\n"
    '* URI Subject Alternative Names "spiffe://x" not allowed by this role'
)


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[object]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        yield capsys
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _emit(fmt: str, capsys: pytest.CaptureFixture[str], *args: object, exc: bool = False) -> list[str]:
    setup_logging("info", fmt)
    token = REQUEST_ID.set("rid-42")
    try:
        log = logging.getLogger("csr_service.test")
        if exc:
            try:
                raise ValueError(VAULT_ERROR)
            except ValueError:
                log.exception("sign failed: %s", *args)
        else:
            log.warning("CreateCertificate failed: %s", *args)
    finally:
        REQUEST_ID.reset(token)
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("text", [FORGED, VAULT_ERROR, "a\rb", "a\x1b[2Jb", "a\u2028b", "a\x85b", "a\x00b"])
def test_text_format_keeps_one_record_on_one_line(logged: pytest.CaptureFixture[str], text: str) -> None:
    lines = _emit("text", logged, text)
    assert len(lines) == 1, lines
    assert "[rid-42]" in lines[0]
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029" for c in lines[0])
    # Nothing is lost: the escapes say what was there.
    assert escape_controls(text) in lines[0]


def test_forged_record_cannot_start_a_line(logged: pytest.CaptureFixture[str]) -> None:
    (line,) = _emit("text", logged, FORGED)
    assert line.split()[2] == "WARNING"  # the forged "INFO" record sits inside the real one
    assert "sa/b\\n2026-12-05" in line


def test_tracebacks_are_one_line_too(logged: pytest.CaptureFixture[str]) -> None:
    lines = _emit("text", logged, "x", exc=True)
    assert len(lines) == 1, lines
    assert "[rid-42]" in lines[0]
    assert "Traceback (most recent call last):\\n" in lines[0]
    assert "not allowed by this role" in lines[0]


@pytest.mark.parametrize("exc", [False, True])
def test_json_format_is_one_line_and_keeps_the_text(logged: pytest.CaptureFixture[str], exc: bool) -> None:
    lines = _emit("json", logged, FORGED, exc=exc)
    assert len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert doc["request_id"] == "rid-42"
    assert FORGED in doc["msg"]  # JSON quotes the newline; the reader gets the text back
    assert "\u2028" not in lines[0]


def test_printable_text_is_unchanged() -> None:
    text = 'issuer vault: role "istio" at pki/sign/istio — ok, \\n stays as typed, ü too'
    assert escape_controls(text) == text
