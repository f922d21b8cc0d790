VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test run test test-fast lock clean

# Re-run setup whenever what it installs changes. requirements.lock pins the tested set (see scripts/lock.sh).
$(VENV)/.installed: scripts/setup.sh requirements.txt requirements.lock pyproject.toml
	bash scripts/setup.sh
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-dev.txt
	bash scripts/setup.sh --test
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(PY) app.py

# In a new random order each time (pytest-randomly prints the seed; see README "Tests").
test: install-test
	$(PY) -m pytest

# Everything but the tests marked slow (fresh processes that train, the embedded model, the browser): a few minutes.
test-fast: install-test
	$(PY) -m pytest -m "not slow"

# The newest releases the ranges allow, tested in a fresh .venv-lock; requirements.lock is rewritten only if they pass.
lock:
	bash scripts/lock.sh

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache
