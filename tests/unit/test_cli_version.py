"""``--version`` names the commit an installation was built from, when it was stamped with one."""

from __future__ import annotations

from pathlib import Path

import pytest

from csr_service import __version__, cli


def test_a_checkout_reports_the_version_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli.resources, "files", lambda _package: tmp_path)  # no BUILD_REVISION
    assert cli.version_text() == f"csr-service {__version__}"


def test_a_stamped_build_reports_its_commit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "BUILD_REVISION").write_text("0123abcd\n")
    monkeypatch.setattr(cli.resources, "files", lambda _package: tmp_path)
    assert cli.version_text() == f"csr-service {__version__} (revision 0123abcd)"


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_version_flag_at_the_top_and_on_serve(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The image's entrypoint is ``csr-service serve``: ``docker run IMAGE --version`` lands on serve."""
    with pytest.raises(SystemExit) as exit_info:
        cli.make_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == cli.version_text()
