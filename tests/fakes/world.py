"""Everything the pipeline's use cases take, faked around one clock, for unit tests.

    world = FakeWorld.build(tmp_path)          # routes work, home (same folder as work), news
    ref = world.arrive("work", flags=("\\\\Seen",))
    result = world.copier().copy_message(ref)
    world.destination.bodies("Work"), world.claim(ref).status, world.queue.depths()

The state store is a real SqliteStateStore on a file under the test's tmp_path (embedded, no
server), on the world's clock, wrapped in a FailingStateStore; the queue is a FakeQueue whose
waits move that clock; the sources are FakeSources by Gmail user; the destination a FakeDestination.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.mailbox.port import fingerprint
from shared.message_ref import MessageRef
from shared.pipeline.budget import DownloadBudget
from shared.pipeline.copier import Copier, lease_for
from shared.settings import Route
from shared.state.port import Claim, FailureRecord
from shared.state.sqlite import SqliteStateStore
from tests.fakes.clock import FakeClock
from tests.fakes.mailbox import DEFAULT_INTERNALDATE, FakeDestination, FakeMailboxes, FakeSource
from tests.fakes.queue import FakeQueue
from tests.fakes.routes import make_route
from tests.fakes.state import FailingStateStore

LEASE_SECONDS = 60


def default_routes() -> list[Route]:
    return [
        make_route("work", gmail_user="alice@gmail.test", outlook_folder="Work"),
        # Another account into the same folder: a message copied by one is a duplicate for the other.
        make_route("home", gmail_user="bob@gmail.test", outlook_folder="Work"),
        make_route("news", gmail_user="alice@gmail.test", gmail_folder="News", outlook_folder="News"),
    ]


@dataclass
class FakeWorld:
    clock: FakeClock
    state: FailingStateStore
    queue: FakeQueue
    sources: dict[str, FakeSource]  # by Gmail user
    destination: FakeDestination
    mailboxes: FakeMailboxes
    routes: dict[str, Route]

    @classmethod
    def build(
        cls, directory: Path, routes: Sequence[Route] | None = None, *, max_receive_count: int = 5
    ) -> FakeWorld:
        clock = FakeClock()
        routes = list(routes if routes is not None else default_routes())
        sources = {user: FakeSource(user) for user in dict.fromkeys(route.gmail_user for route in routes)}
        for route in routes:
            sources[route.gmail_user].folder(route.gmail_folder)
        destination = FakeDestination()
        return cls(
            clock=clock,
            state=FailingStateStore(SqliteStateStore(Path(directory) / "state.db", clock=clock)),
            queue=FakeQueue(max_receive_count=max_receive_count, clock=clock, waits_move_clock=True),
            sources=sources,
            destination=destination,
            mailboxes=FakeMailboxes(sources, destination),
            routes={route.name: route for route in routes},
        )

    def copier(
        self,
        owner: str = "consumer-1",
        lease_seconds: float = LEASE_SECONDS,
        *,
        max_attempts: int | None = None,
        daily_download_bytes: int | None = None,
    ) -> Copier:
        """A consumer process (another owner: another process sharing state and mailboxes);
        `daily_download_bytes`: each source account's download budget (None: none kept)."""
        budget = None
        if daily_download_bytes is not None:
            budget = DownloadBudget(self.state, daily_download_bytes, clock=self.clock)
        return Copier(
            state=self.state,
            mailboxes=self.mailboxes,
            routes=self.routes,
            owner=owner,
            lease_until=lease_for(lease_seconds, self.clock),
            max_attempts=max_attempts,
            download_budget=budget,
            clock=self.clock,
        )

    def source_of(self, route: str) -> FakeSource:
        return self.sources[self.routes[route].gmail_user]

    def arrive(
        self,
        route: str,
        body: bytes | None = None,
        *,
        flags: Sequence[str] = (),
        internaldate: dt.datetime = DEFAULT_INTERNALDATE,
        gmail_msgid: int | None = None,
    ) -> MessageRef:
        """A message arrives in the route's source folder: the reference the producer would queue."""
        folder = self.routes[route].gmail_folder
        uid = self.source_of(route).add(folder, body, flags=flags, internaldate=internaldate, gmail_msgid=gmail_msgid)
        return self.ref(route, uid)

    def ref(self, route: str, uid: int) -> MessageRef:
        """The reference to a message in the source now (as the producer makes it)."""
        source = self.source_of(route)
        folder = self.routes[route].gmail_folder
        summary = source.message(folder, uid).summary()
        uidvalidity = source.folder(folder).uidvalidity
        return MessageRef(route, uidvalidity, uid, fingerprint(summary), summary.size)

    def claim(self, ref: MessageRef) -> Claim | None:
        return self.state.inner.get_claim(ref.key)

    def failure(self, ref: MessageRef) -> FailureRecord | None:
        return self.state.inner.get_failure(ref.key)

    def close(self) -> None:
        self.state.close()
