"""Who holds a claim (shared.claim_owners): a local holder is known alive or gone by host, pid and
start time; a Lambda's, or another host's, cannot be told from here."""

from __future__ import annotations

import socket
import subprocess
import sys

from shared.claim_owners import describe_holder, holder_state, lambda_invocation, this_process
from shared.state import HolderState


def test_this_process_is_alive():
    owner = this_process()
    assert owner.startswith(f"local:{socket.gethostname()}:")
    assert holder_state(owner) is HolderState.ALIVE
    assert this_process() != owner  # one name per copier, even in one process


def test_a_process_that_ended_is_gone():
    child = subprocess.run(
        [sys.executable, "-c", "from shared.claim_owners import this_process; print(this_process())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert holder_state(child.stdout.strip()) is HolderState.GONE


def test_another_process_under_the_same_pid_means_the_holder_is_gone():
    _, host, pid, started, tail = this_process().split(":")
    assert holder_state(f"local:{host}:{pid}:{float(started) - 3600:.2f}:{tail}") is HolderState.GONE


def test_holders_that_cannot_be_told_from_here():
    _, _, pid, started, tail = this_process().split(":")
    assert holder_state(f"local:elsewhere.example:{pid}:{started}:{tail}") is HolderState.UNKNOWN
    assert holder_state(lambda_invocation("8f1c")) is HolderState.UNKNOWN
    assert holder_state("laptop:4242:abcd1234") is HolderState.UNKNOWN  # named by an earlier version


def test_a_holder_is_described_for_people():
    _, _, pid, started, tail = this_process().split(":")
    assert describe_holder(this_process()) == f"pid {pid} on this host"
    assert describe_holder(f"local:nas:{pid}:{started}:{tail}") == f"pid {pid} on host nas"
    assert describe_holder("lambda:8f1c") == "lambda:8f1c"
