"""Dovecot servers for tests (written next)."""
