pytest_plugins = [
    "tests.harness.aws",
    "tests.harness.mail",
    "tests.harness.oauth",
]
