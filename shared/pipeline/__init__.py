"""The use cases: find new messages and enqueue references (`scan`), copy referenced messages
exactly once (`copier`), the local consumer loop (`consume`), and the dead letters (`redrive`).

They take their collaborators (state store, queue, mailboxes) as parameters and import no
adapter: see `shared.bootstrap` for the wiring.
"""
