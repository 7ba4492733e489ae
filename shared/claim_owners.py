"""Who holds a claim, and whether that holder may still be at work.

A claim's lease running out does not prove its holder is gone: a drain frozen with SIGSTOP (a
laptop lid, a paused VM) wakes up and finishes the APPEND it had sent, and a second copy taken
over meanwhile would be a duplicate. So a local holder is named by host, pid and the process's
start time, and on the same host it is asked after: alive (its claim is not taken over, lease or
not), or gone (taken over at once, lease or not: a rerun after a crash need not wait it out).
A Lambda invocation cannot outlive its deadline, which its lease already covers; a holder on
another host, or named by an earlier version, is judged by its lease alone.
"""

from __future__ import annotations

import re
import socket
import uuid

import psutil

from shared.state import HolderState

_LOCAL = "local"
_LOCAL_OWNER = re.compile(r"\blocal:[^:\s]+:\d+:[\d.]+:[0-9a-f]+\b")
# Start times are compared to this precision: psutil's create_time is a float of the same
# source, but its last digits may differ between reads on some systems.
_START_PRECISION = 0.01


def this_process() -> str:
    """`local:<host>:<pid>:<start time>:<random>`: unique per process (and per copier built in
    it), readable in `status` and the logs."""
    me = psutil.Process()
    return f"{_LOCAL}:{socket.gethostname()}:{me.pid}:{me.create_time():.2f}:{uuid.uuid4().hex[:8]}"


def lambda_invocation(request_id: str) -> str:
    return f"lambda:{request_id}"


def holder_state(owner: str) -> HolderState:
    """Whether the local process named by `owner` is alive, gone, or cannot be told from here."""
    parts = owner.split(":")
    if len(parts) != 5 or parts[0] != _LOCAL or parts[1] != socket.gethostname():
        return HolderState.UNKNOWN
    try:
        pid, started = int(parts[2]), float(parts[3])
    except ValueError:
        return HolderState.UNKNOWN
    try:
        process = psutil.Process(pid)
        alive = abs(process.create_time() - started) < _START_PRECISION and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return HolderState.GONE
    except psutil.Error:
        return HolderState.UNKNOWN  # not ours to look at: judged by its lease
    # Another process with that pid now: the holder is gone.
    return HolderState.ALIVE if alive else HolderState.GONE


def describe_holder(owner: str | None) -> str:
    """For messages: `pid 1234 on this host` for a local holder, else its name."""
    if owner is None:
        return "nobody"
    parts = owner.split(":")
    if len(parts) == 5 and parts[0] == _LOCAL:
        where = "this host" if parts[1] == socket.gethostname() else f"host {parts[1]}"
        return f"pid {parts[2]} on {where}"
    return owner


def readable(text: str) -> str:
    """`text` with each local owner's name as `describe_holder` gives it."""
    return _LOCAL_OWNER.sub(lambda found: describe_holder(found.group(0)), text)
