# The newcomer's commands. Each sets up what it needs first. Every install comes from uv.lock.
#   make test    install Dovecot if missing, make .venv, run every test (in PYTEST_WORKERS processes)
#   make unit    make .venv, run only the unit tests (no servers; the use cases on fakes)
#   make drain   make .venv, then copy every route's new mail until nothing is left
#   make check   make .venv, then validate settings and log in to every mailbox
#   make demo    install Dovecot if missing, make .venv, then copy sample mail between two local
#                throwaway IMAP servers: no account, no settings; nothing is left running
#   make package   the Lambda code package (build/lambda/mail-syncer.zip) for serverless.yml
#   make template  package, then the CloudFormation of stage ci in .serverless/ (no AWS account)
#   make lock    re-resolve uv.lock: every dependency at its newest allowed version
#                (make lock LOCK_ARGS= only brings it in line with an edited pyproject.toml)
#   make lock-check  fail unless uv.lock agrees with pyproject.toml (CI runs this first)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Made when .venv was last synced with uv.lock (not .venv/bin/python: a symlink to $(PYTHON)).
SYNCED := $(VENV)/.synced

# uv at the one version pyproject.toml's [tool.uv].required-version names, installed from PyPI
# into .tools/ (a venv of its own: no PATH, user site or system Python is changed).
UV_VERSION := $(shell sed -n 's/^required-version = "==\([0-9.]*\)"$$/\1/p' pyproject.toml)
$(if $(UV_VERSION),,$(error pyproject.toml has no [tool.uv] required-version = "==X.Y.Z"))
UV_HOME := .tools/uv-$(UV_VERSION)
# Exported: infra/build_package.py runs this uv (the variable `uv run` sets too).
export UV := $(CURDIR)/$(UV_HOME)/bin/uv
# .venv's Python is $(PYTHON); uv never downloads one of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
# What `make lock` passes to `uv lock`: by default every dependency moves to its newest version.
LOCK_ARGS ?= --upgrade
# pytest-xdist workers for `make test`, apart from PYTEST_ARGS so that passing options keeps them
# (PYTEST_WORKERS=0: one process). Most tests wait on servers, subprocesses and timeouts, so twice
# the cores, at least 4: on 2 cores the suite took 13.5 min in one process, 5.6 with 4 or 6
# workers, and longer with 8 (the CPU is the limit there). --dist worksteal: an idle worker takes
# tests queued for a busy one, so a few long e2e tests do not leave the others waiting at the end.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 2 ? 2 * n : 4 )))

.PHONY: test unit check drain demo dovecot system-packages package template lock lock-check

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check --only-binary=:all: uv==$(UV_VERSION)

# --locked: install exactly uv.lock, and fail (instead of re-resolving) when pyproject.toml
# changed without `make lock`. The project goes in editable, so `python -m shared.cli` runs this tree.
$(SYNCED): pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --extra test
	@touch $(SYNCED)

lock: | $(UV)
	$(UV) lock $(LOCK_ARGS)

lock-check: | $(UV)
	$(UV) lock --check

# Tests and the demo start their own Dovecot servers; only the binaries are needed (Debian: dovecot-imapd).
dovecot:
	@command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || { \
		echo "installing dovecot-imapd (the tests' IMAP servers)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dovecot-imapd; }

system-packages: dovecot
	@# The deployment test packages serverless.yml with osls, which runs on Node.js (npx).
	@command -v npx >/dev/null 2>&1 || { \
		echo "Node.js 20.19+ with npm is needed (npx runs osls for the deployment test): https://nodejs.org"; exit 1; }

test: system-packages $(SYNCED)
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The use cases on fakes, settings, message refs and the deploy template: no Dovecot, no moto.
unit: $(SYNCED)
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

check: $(SYNCED)
	$(PY) -m shared.cli check

drain: $(SYNCED)
	$(PY) -m shared.cli drain

# The demo runs the tests' servers (tests/harness): it needs what `make test` installs, less Node.js.
demo: dovecot $(SYNCED)
	$(PY) infra/demo.py

# The runtime dependencies at uv.lock's versions, as wheels for Lambda's platform (infra/build_package.py).
package: $(SYNCED)
	$(PY) infra/build_package.py

# tests/unit/test_deploy_template.py reads this template when it is newer than serverless.yml.
template: package
	bash infra/osls.sh package --stage ci
