pytest_plugins = [
    "tests.harness.aws",
    "tests.harness.imap_proxy",
    "tests.harness.mail",
    "tests.harness.oauth",
    "tests.harness.sync_env",
]
