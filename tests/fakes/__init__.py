"""Fakes of the pipeline's ports, for unit tests that need no server: small, faithful to what the
ports document, and scriptable for faults. Each module's docstring has the details.

- `FakeWorld.build(tmp_path)`: all of the below around one FakeClock, with routes work and home
  (two accounts into folder Work) and news; `arrive(route)` -> the MessageRef the producer would
  queue, `copier(owner)`, `claim(ref)`, `failure(ref)`.
- `FakeSource` (SourceMailbox; one account, `session()` for another session): `folder`, `add`,
  `expunge`, `renumber`; faults `fail_next(op, error, after=)`, `throttle_next(op, retry_after)`, `quota_spent_next(op)`,
  `answer_next(op, value)`, `fetch_answers_without_body()`, `fetch_answers_with(folder, uid)` (another
  UID's data), `before_next(op, action)`; `calls`.
- `FakeDestination` (DestinationMailbox): `messages(folder)`, `bodies(folder)`, `appends`;
  `refuse_next_append(reason, permanent=, retry_after=, final_after=)`, `throttle_next`, `block_next_append()`
  -> AppendGate, `lose_connection_in_next_append(landed=)`, `fail_next`, `before_next`; `calls`.
- `FakeMailboxes(sources, destination)` (Mailboxes): `sources_opened`, `source_drops`,
  `destinations_opened`, `destination_drops`; `open_source` is scan's OpenSource.
- `FakeQueue` (MessageQueue, in memory, in the queue contract suite): `send_raw`, `calls`,
  `refs()`, `visible_at(id)`, `fail_next`; `waits_move_clock=True` makes long polls simulated.
- `FailingStateStore(inner)` (StateStore): `fail(method, after=, times=, error=)`, `heal()`, `calls`.
"""

from tests.fakes.clock import FakeClock
from tests.fakes.faults import Answer, FaultScript
from tests.fakes.mailbox import (
    AppendGate,
    ConnectionLost,
    FakeDestination,
    FakeFolder,
    FakeMailboxError,
    FakeMailboxes,
    FakeQuotaSpent,
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
    "FakeQuotaSpent",
    "FakeSource",
    "FakeThrottled",
    "FakeWorld",
    "FaultScript",
    "StoredMessage",
    "email",
    "make_route",
]
