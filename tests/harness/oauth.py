"""Local OAuth endpoints for tests (written next)."""
