VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test run test clean

# Re-run setup whenever what it installs changes.
$(VENV)/.installed: scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-dev.txt
	bash scripts/setup.sh --test
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(PY) app.py

test: install-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
