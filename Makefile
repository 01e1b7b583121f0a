# The two commands of the README: `make serve` (serve the bundled demo model) and `make test` (the whole suite).
# Each creates .venv if missing and installs what it needs. torch is installed first as the CPU build
# (torch==2.13.0, on disk on these machines); GPU users see the README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fp4serve-installed

.PHONY: serve test install lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/fp4serve serve $(ARGS)

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check fp4serve tests
