# The two commands of the README: `make run` and `make test`. Both set up
# everything on a fresh machine (virtualenv, Python packages, and the Debian
# packages the tests use as real parts).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint image-test bench venv system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,mmdb]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

run: venv
	bash scripts/run-demo.sh

test: venv system-deps
	$(BIN)/python -m pytest -q
	bash scripts/image-test.sh

# ruff (pyflakes/pycodestyle errors) and mypy (strict on the pure core).
lint: venv
	$(BIN)/ruff check smtpguard tests bench
	$(BIN)/mypy smtpguard

# The container image built and run for real with podman (issue 17); it says
# "image-test: SKIPPED: <why>" where podman cannot be installed or run.
image-test: venv system-deps
	bash scripts/image-test.sh

bench: venv system-deps
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) run .pytest_cache .hypothesis
