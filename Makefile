# incus-borg: one entry point for installing, checking and testing.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test unit check docs deps venv demo dist clean

## test: install what is missing (system packages, venv), then ruff, mypy, the docs and pytest
test: deps venv check docs
	$(BIN)/pytest

## unit: the pure unit tests only (seconds; no root, no Incus)
unit: venv
	$(BIN)/pytest tests/unit

## check: ruff and mypy only
check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## docs: the documentation site in site/ (mkdocs build --strict: a broken link fails it)
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## demo: a throwaway private Incus is backed up, loses an instance and a profile, gets them back
demo: deps venv
	$(BIN)/python scripts/demo.py

## dist: the sdist and the wheel in dist/, with the standard `build` frontend (the wheel holds
## the hooks, installed beside incus-borg, and the examples, under <venv>/share/incus-borg)
dist: venv
	rm -rf dist build incus_borg.egg-info
	$(BIN)/python -m build --outdir dist .

## deps: system packages (Incus from backports, busybox-static, btrfs-progs, borg's build libraries, ...)
deps:
	bash scripts/install-system-deps.sh

## venv: .venv with incus-borg, its test tools and the docs tools
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,docs]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache dist build incus_borg.egg-info site
