"""Backends are imported only when selected: the core runs without hvac or kubernetes loaded."""

from __future__ import annotations

import subprocess
import sys


def test_cli_and_config_do_not_import_backends() -> None:
    code = (
        "import sys; from csr_service.cli import make_parser, build_config; make_parser();"
        "from csr_service.config import Config, resolve; Config.from_values(resolve({}, env={}));"
        "bad = [m for m in ('hvac', 'kubernetes') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
