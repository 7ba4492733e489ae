"""Fakes of the pipeline's ports, for unit tests that need no server: small, faithful to the
ports' documented behaviour, and scriptable for faults. See each module's docstring."""

from tests.fakes.clock import FakeClock
from tests.fakes.faults import Answer, FaultScript
from tests.fakes.mailbox import (
    AppendGate,
    ConnectionLost,
    FakeDestination,
    FakeFolder,
    FakeMailboxError,
    FakeMailboxes,
    FakeSource,
    FakeThrottled,
    StoredMessage,
    email,
)
from tests.fakes.queue import FakeQueue
from tests.fakes.routes import make_route
from tests.fakes.state import FailingStateStore
from tests.fakes.world import FakeWorld

__all__ = [
    "Answer",
    "AppendGate",
    "ConnectionLost",
    "FailingStateStore",
    "FakeClock",
    "FakeDestination",
    "FakeFolder",
    "FakeMailboxError",
    "FakeMailboxes",
    "FakeQueue",
    "FakeSource",
    "FakeThrottled",
    "FakeWorld",
    "FaultScript",
    "StoredMessage",
    "email",
    "make_route",
]
