"""``serve`` runs with glibc's malloc thread cache enlarged (csr_service/infra/malloc.py): the
environment it restarts itself with, and the restart itself (once, and not when set already)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from csr_service.infra.malloc import TCACHE_COUNT, tuned_environment

OURS = f"glibc.malloc.tcache_count={TCACHE_COUNT}"


def test_the_tunable_is_added_to_an_environment_without_it() -> None:
    assert tuned_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": OURS}
    assert tuned_environment({"GLIBC_TUNABLES": ""}) == {"GLIBC_TUNABLES": OURS}
    other = "glibc.malloc.mxfast=0:glibc.malloc.tcache_max=1024"  # another tunable of the same prefix
    assert tuned_environment({"GLIBC_TUNABLES": other}) == {"GLIBC_TUNABLES": f"{other}:{OURS}"}


@pytest.mark.parametrize("given", ["glibc.malloc.tcache_count=7", "glibc.malloc.mxfast=0:glibc.malloc.tcache_count=0"])
def test_an_operators_own_value_is_kept(given: str) -> None:
    assert tuned_environment({"GLIBC_TUNABLES": given}) is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the restart happens on glibc only")
@pytest.mark.parametrize(
    ("given", "expected"), [("", OURS), ("glibc.malloc.tcache_count=7", "glibc.malloc.tcache_count=7")]
)
def test_the_restart_happens_once_and_only_when_needed(given: str, expected: str) -> None:
    code = (
        "import os, sys; print('start', flush=True);"
        "from csr_service.infra.malloc import restart_with_malloc_tuning; restart_with_malloc_tuning();"
        "print('tuned', os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    env = {**os.environ, "GLIBC_TUNABLES": given}
    res = subprocess.run([sys.executable, "-c", code, "a", "b c"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    starts = 2 if given == "" else 1  # the process ran its start once more after the restart
    assert res.stdout.splitlines() == ["start"] * starts + [f"tuned {expected} ['a', 'b c']"]
