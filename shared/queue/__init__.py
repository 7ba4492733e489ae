from shared.queue.port import MAX_BATCH, MessageQueue, QueueDepths, ReceivedMessage  # noqa: F401
