"""Docs generated from code are up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == mod.render(), "docs/configuration.md is stale: run `make docs`"


def test_agent_doc_names_every_agent_flag() -> None:
    """docs/agent.md keeps up with ``csr-service agent``'s flags (and gen-istio-cert's aliases)."""
    import argparse

    from csr_service.agent.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    doc = (ROOT / "docs" / "agent.md").read_text()
    missing = sorted(f for f in flags if f"`{f}" not in doc and f"{f}=" not in doc and f"({f}" not in doc)
    assert not missing, f"docs/agent.md does not mention {missing}"
