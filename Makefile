# The newcomer's commands. Each sets up what it needs first.
#   make test    install Dovecot if missing, make .venv, run every test
#   make drain   make .venv, then copy every route's new mail until nothing is left
#   make check   make .venv, then validate settings and log in to every mailbox
#   make package   the Lambda code package (build/lambda/mail-syncer.zip) for serverless.yml
#   make template  package, then the CloudFormation of stage ci in .serverless/ (no AWS account)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test check drain system-packages package template

$(PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(PY)

# Tests start their own Dovecot servers; only the binaries are needed (Debian: dovecot-imapd).
system-packages:
	@command -v dovecot >/dev/null 2>&1 || [ -x /usr/sbin/dovecot ] || { \
		echo "installing dovecot-imapd (the tests' IMAP servers)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dovecot-imapd; }
	@# The deployment test packages serverless.yml with osls, which runs on Node.js (npx).
	@command -v npx >/dev/null 2>&1 || { \
		echo "Node.js 20.19+ with npm is needed (npx runs osls for the deployment test): https://nodejs.org"; exit 1; }

test: system-packages $(PY)
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(PY)
	$(PY) -m shared.cli check

drain: $(PY)
	$(PY) -m shared.cli drain

# Dependencies as wheels for Lambda's platform, pinned to the versions in .venv (infra/build_package.py).
package: $(PY)
	$(PY) infra/build_package.py

# tests/unit/test_deploy_template.py reads this template when it is newer than serverless.yml.
template: package
	bash infra/osls.sh package --stage ci
