from shared.queue.port import (  # noqa: F401
    MAX_BATCH,
    DeadLetter,
    MessageQueue,
    QueueDepths,
    ReceivedMessage,
    Redriven,
)
