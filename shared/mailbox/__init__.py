"""The mailboxes: the port the pipeline reads and writes through (`port`), and its IMAP side:
opening an authenticated session (`session`), the source and destination adapters (`imap`),
sessions kept open and reopened (`connections`), and the retry policies (`retry`).

Importing this package imports the port only; use cases never import the IMAP modules.
"""
