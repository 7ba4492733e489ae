"""Which exit code a queue failure gets: the local queue lives in the state file, so that file
failing is the state store failing (4, as the README promises); any other queue failing is 5."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.cli import main as cli_main
from shared.cli.parser import build_parser
from shared.cli.report import ExitCode
from shared.errors import QueueUnavailable

STATE_DB = Path("/data/state.db")


def run_failing(monkeypatch, exc: Exception, *, state_table: str | None = None) -> int:
    """`scan` with settings where the state store is in STATE_DB (or `state_table`), its use case raising `exc`."""
    settings = SimpleNamespace(
        state_table=state_table, state_db_path=STATE_DB, log_level="INFO", log_format="text", requests_ca_bundle=None
    )
    monkeypatch.setattr(cli_main, "load_settings", lambda env_file: settings)
    monkeypatch.setattr(cli_main.bootstrap, "build", lambda settings: SimpleNamespace(close=lambda **how: None))
    monkeypatch.setattr("signal.signal", lambda *args: None)  # main's handlers stay out of pytest's process
    parser, handlers = build_parser()

    def failing(args, app, report):
        raise exc

    monkeypatch.setattr(cli_main, "build_parser", lambda: (parser, dict.fromkeys(handlers, failing)))
    return cli_main.main(["scan"])


def test_the_local_queue_failing_in_the_state_file_shuts_the_gate(monkeypatch, capsys):
    said = (
        f"SQLite queue {STATE_DB}: database or disk is full: free space on the disk holding {STATE_DB}, then run again"
    )

    code = run_failing(monkeypatch, QueueUnavailable(said, path=STATE_DB))

    out, err = capsys.readouterr()
    assert code == ExitCode.GATE
    assert out == f"FAIL  state store        {said}\n"
    assert err == "stopped: no mailbox is opened while the state store fails; run again once it works\n"


@pytest.mark.parametrize(
    ("exc", "state_table"),
    [
        (QueueUnavailable("SQS https://sqs.example/q.fifo: AccessDenied: no"), None),
        # State in DynamoDB, the queue alone in the SQLite file: only the queue has failed.
        (QueueUnavailable(f"SQLite queue {STATE_DB}: database or disk is full", path=STATE_DB), "mail-syncer-state"),
        (QueueUnavailable("SQLite queue /elsewhere/queue.db: disk I/O error", path=Path("/elsewhere/queue.db")), None),
    ],
)
def test_any_other_queue_failing_is_unreachable(monkeypatch, capsys, exc, state_table):
    code = run_failing(monkeypatch, exc, state_table=state_table)

    out, err = capsys.readouterr()
    assert code == ExitCode.UNREACHABLE
    assert (out, err) == ("", f"error: {exc}\n")
