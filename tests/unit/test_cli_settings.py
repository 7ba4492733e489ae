"""What a newcomer sees when the settings are missing or wrong: every problem at once, where to
go next, and a settings file named on the command line that is not there is an error, not
silently the environment alone (which under cron copies nothing, or the wrong thing)."""

from __future__ import annotations

import pytest

from shared.cli import main as cli_main


def test_a_fresh_clone_names_every_missing_setting_and_where_they_are_described(bare, capsys):
    code = cli_main.main(["drain"])
    out = capsys.readouterr().out
    assert code == 3
    for name in ("GMAIL_USER", "OUTLOOK_FOLDER", "GMAIL_REFRESH_TOKEN", "OUTLOOK_USER", "MS_REFRESH_TOKEN"):
        assert f"{name}: required" in out, out
    assert "cp .env.example .env" in out and "make check" in out


@pytest.mark.parametrize("command", [["drain"], ["check"], ["auth", "gmail", "--no-browser"]])
def test_an_env_file_that_is_not_there_is_an_error_naming_it(bare, capsys, command):
    code = cli_main.main(["--env-file", str(bare / "no-such.env"), *command])
    captured = capsys.readouterr()
    assert code == 3
    assert f"--env-file {bare / 'no-such.env'}: no such file" in captured.out + captured.err


def test_the_default_env_file_may_be_absent(bare, capsys, monkeypatch):
    """Settings in the environment alone (a container, CI): no .env is fine."""
    monkeypatch.setenv("GMAIL_USER", "a@gmail.test")
    code = cli_main.main(["drain"])
    out = capsys.readouterr().out
    assert code == 3  # other settings are missing, but not the file
    assert "--env-file" not in out and "GMAIL_USER" not in out
