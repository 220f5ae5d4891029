"""Write docs/configuration.md from the declared options (run: python scripts/gen_config_docs.py).

tests/unit/test_docs.py fails when the committed file differs, so the reference cannot drift
from --help.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from csr_service.cli import _GROUP_TITLES  # noqa: E402
from csr_service.config import all_options  # noqa: E402

HEADER = """# Configuration reference

Generated from the code by `python scripts/gen_config_docs.py`; do not edit by hand.

Every option of `csr-service serve` can be given three ways, highest precedence first:

1. a flag: `--max-certificate-duration 2h`
2. an environment variable: `CSR_SERVICE_MAX_CERTIFICATE_DURATION=2h`
3. a key in the TOML file named by `--config`: `max-certificate-duration = "2h"`

Durations are Go-style (`90s`, `30m`, `1h30m`); lists are comma-separated in flags and
environment variables, and TOML arrays in the file. Options of an issuer are only used when
that issuer is selected with `--issuer`.
"""


def render() -> str:
    out = [HEADER]
    groups: dict[str, list[str]] = {}
    for opt in all_options():
        title = _GROUP_TITLES.get(opt.group, f"issuer `{opt.group}`")
        text = opt.help.replace("|", "\\|")
        groups.setdefault(title, []).append(f"| `--{opt.name}` | `{opt.env}` | `{opt.describe_default()}` | {text} |")
    for title, rows in groups.items():
        out.append(f"\n## {title}\n")
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        out.extend(rows)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    (ROOT / "docs" / "configuration.md").write_text(render())
    print("wrote docs/configuration.md", file=sys.stderr)
