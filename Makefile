# The newcomer's commands. Each sets up what it needs first.
#   make test    install Dovecot if missing, make .venv, run every test
#   make drain   make .venv, then copy every route's new mail until nothing is left
#   make check   make .venv, then validate settings and log in to every mailbox
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test check drain system-packages

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

test: system-packages $(PY)
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(PY)
	$(PY) -m shared.cli check

drain: $(PY)
	$(PY) -m shared.cli drain
