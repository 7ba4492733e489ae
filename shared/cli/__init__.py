"""`python -m shared.cli`: the commands a person runs (see `shared.cli.main`)."""
