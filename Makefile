# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then run the whole method on real data (coar demo)
#   make test   set up .venv, then lint and run the full test suite
PY ?= python3
VENV ?= .venv

.PHONY: setup demo test test-fast lint bench

# The demo needs coarpy alone (matplotlib draws its report); the tests need the dev set.
$(VENV)/.installed-report: pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) EXTRAS=report bash scripts/setup.sh
	touch $@

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) EXTRAS=dev bash scripts/setup.sh
	touch $@ $(VENV)/.installed-report

setup: $(VENV)/.installed

demo: $(VENV)/.installed-report
	$(VENV)/bin/coar demo

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

test: lint
	$(VENV)/bin/python -m pytest -q

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"
