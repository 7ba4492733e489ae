"""The rows of the tables printed after the run, brought to one process under pytest-xdist.

A pytest plugin (tests/conftest.py lists it). `make test` runs the tests in xdist's worker
processes, so the lists and counts that tests fill (the fault matrix, the server behaviours, the
fuzz inputs) fill there, while the process that prints the summary, xdist's controller, runs no
test. Each worker hands over its rows when its session ends (`config.workeroutput`, which xdist
sends to the controller); the controller takes them as each worker goes down
(`pytest_testnodedown`). Rows are put in the order of the tests that recorded them in the
collection, which is the same in every worker, so a table reads as in a run without xdist.
Without xdist nothing is handed over: the tables are in the one process already.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

# Per table's name: its rows (instances of one dataclass) and that dataclass.
_ROWS: dict[str, tuple[list[Any], type]] = {}
# Per table's name: for each of its rows, where the test that recorded it is in the collection.
_POSITIONS: dict[str, list[int]] = {}
_COUNTS: dict[str, Counter[str]] = {}
# A test's place in the collection, by node id.
_COLLECTED: dict[str, int] = {}


def gathered_rows(name: str, row_type: type) -> list[Any]:
    """The list a table's rows are appended to: instances of the dataclass `row_type`, whose
    fields are plain values (they travel from the workers as dicts)."""
    rows: list[Any] = []
    _ROWS[name] = (rows, row_type)
    _POSITIONS[name] = []
    return rows


def gathered_counts(name: str) -> Counter[str]:
    """A Counter whose counts are summed over the workers."""
    counts: Counter[str] = Counter()
    _COUNTS[name] = counts
    return counts


def pytest_collection_finish(session: pytest.Session) -> None:
    _COLLECTED.update((item.nodeid, position) for position, item in enumerate(session.items))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        _place_new_rows(_COLLECTED[item.nodeid])


def _place_new_rows(position: int) -> None:
    for name, (rows, _) in _ROWS.items():
        positions = _POSITIONS[name]
        positions.extend([position] * (len(rows) - len(positions)))


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    if output is None:  # not an xdist worker
        return
    _place_new_rows(len(_COLLECTED))  # any recorded after the last test: last
    output["gathered_rows"] = {
        name: [(position, dataclasses.asdict(row)) for position, row in zip(_POSITIONS[name], rows)]
        for name, (rows, _) in _ROWS.items()
    }
    output["gathered_counts"] = {name: dict(counts) for name, counts in _COUNTS.items()}


@pytest.hookimpl(optionalhook=True)  # xdist's hook, unknown to pytest without it
def pytest_testnodedown(node, error) -> None:
    output = getattr(node, "workeroutput", None) or {}  # none from a worker that crashed
    for name, received in output.get("gathered_rows", {}).items():
        rows, row_type = _ROWS[name]
        positions = _POSITIONS[name]
        # A stable sort: one test's rows, all from one worker, keep the order it recorded them in.
        merged = sorted(
            [*zip(positions, rows), *((position, row_type(**fields)) for position, fields in received)],
            key=lambda pair: pair[0],
        )
        positions[:] = [position for position, _ in merged]
        rows[:] = [row for _, row in merged]
    for name, received in output.get("gathered_counts", {}).items():
        _COUNTS[name].update(received)
