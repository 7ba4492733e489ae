from shared.state.port import (  # noqa: F401
    Claim,
    ClaimOutcome,
    ClaimResult,
    ClaimStatus,
    CopiedMessage,
    FailureRecord,
    Pause,
    RouteCounts,
    ScanRecord,
    StateStore,
    UidKey,
    Watermark,
)
