"""README's "Running it on a schedule": the systemd units and the cron line a user copies, read
as systemd and cron would read them, and checked to run the same drain."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from shared.cli.parser import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
# An HTML comment (not rendered) names each block: `<!-- schedule: NAME -->`, then the fence.
MARKED_BLOCK = re.compile(r"^<!-- schedule: (\S+) -->\n```\w*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# minute, hour, day of month, month, day of week: the values each field takes (crontab(5)).
CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def schedule_blocks() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Running it on a schedule\n", 1)[1].split("\n## ", 1)[0]
    return {name: body for name, body in MARKED_BLOCK.findall(section)}


def unit_file(text: str) -> configparser.ConfigParser:
    """A systemd unit as systemd reads it, near enough: sections, keys as written (case kept),
    `#` and `;` comments; a repeated key is allowed (the last one here)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read_string(text)
    return parser


def cron_field_ok(field: str, low: int, high: int) -> bool:
    """`*`, `N`, `N-M`, each with an optional `/STEP`, in a comma-separated list."""
    for item in field.split(","):
        found = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", item)
        if not found:
            return False
        start, end, step = found.group(2), found.group(3), found.group(4)
        numbers = [int(n) for n in (start, end) if n is not None]
        if any(not low <= n <= high for n in numbers) or (end and int(end) < int(start)) or (step and int(step) == 0):
            return False
    return True


def drain_argv(command: str) -> list[str]:
    """`PYTHON -m shared.cli [--env-file PATH] drain`, checked with the CLI's own parser."""
    argv = shlex.split(command)
    assert argv[1:3] == ["-m", "shared.cli"], argv
    args = build_parser()[0].parse_args(argv[3:])
    assert args.command == "drain", argv
    assert args.env_file and PurePosixPath(args.env_file).is_absolute(), f"--env-file with an absolute path: {argv}"
    return argv


@pytest.fixture(scope="module")
def blocks() -> dict[str, str]:
    found = schedule_blocks()
    assert set(found) == {"mail-syncer.service", "mail-syncer.timer", "crontab"}, sorted(found)
    return found


def test_the_service_runs_drain_from_the_clone_with_its_venv_and_env_file(blocks):
    service = unit_file(blocks["mail-syncer.service"])
    assert service["Service"]["Type"] == "oneshot"  # the timer waits for a run to end
    clone = PurePosixPath(service["Service"]["WorkingDirectory"])
    assert clone.is_absolute()
    argv = drain_argv(service["Service"]["ExecStart"])
    assert PurePosixPath(argv[0]) == clone / ".venv" / "bin" / "python"
    assert PurePosixPath(argv[argv.index("--env-file") + 1]) == clone / ".env"
    # Exit 6 is "the next run copies them", not a failure.
    assert service["Service"]["SuccessExitStatus"].split() == ["6"]


def test_the_timer_starts_the_service_every_5_minutes_and_catches_up_after_the_machine_was_off(blocks):
    timer = unit_file(blocks["mail-syncer.timer"])
    assert "OnCalendar" in timer["Timer"] or "OnUnitActiveSec" in timer["Timer"]
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "mail-syncer.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    if shutil.which("systemd-analyze") and "OnCalendar" in timer["Timer"]:
        # systemd's own reading of the expression: every 5 minutes.
        shown = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=3", timer["Timer"]["OnCalendar"]],
            capture_output=True, text=True, timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert "Normalized form: *-*-* *:00/5:00" in shown.stdout, shown.stdout


def test_the_cron_line_runs_the_services_command_every_5_minutes_into_a_log_file(blocks):
    lines = [line for line in blocks["crontab"].splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 5)
    assert len(fields) == 6, "5 time fields and a command"
    for value, (name, low, high) in zip(fields[:5], CRON_FIELDS):
        assert cron_field_ok(value, low, high), f"cron {name} field {value!r}"
    assert fields[:5] == ["*/5", "*", "*", "*", "*"]
    found = re.fullmatch(r"cd (\S+) && (.+?) >> (\S+) 2>&1", fields[5])
    assert found, f"`cd CLONE && COMMAND >> LOG 2>&1`: {fields[5]!r}"
    clone, command, log = found.groups()
    service = unit_file(blocks["mail-syncer.service"])["Service"]
    assert clone == service["WorkingDirectory"]
    assert command == service["ExecStart"]
    drain_argv(command)
    assert PurePosixPath(log).is_absolute()
    assert "%" not in lines[0]  # cron would end the command at a % (crontab(5))


def test_the_cron_field_check_refuses_what_cron_refuses():
    assert cron_field_ok("*/5", 0, 59) and cron_field_ok("1-5,10", 0, 59) and cron_field_ok("0", 0, 23)
    for bad in ("60", "*/0", "5-1", "a", "", "*/", "1-"):
        assert not cron_field_ok(bad, 0, 59), bad
