# Kiln's two set-up commands: `make up` runs Kiln, `make test` runs every check.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENDOR := src/kiln/web/static/vendor

.PHONY: up test venv test-venv assets system-deps lint typecheck pytest clean

up: venv assets  ## Install Kiln and run it on its embedded defaults
	$(BIN)/kiln up

test: system-deps test-venv assets lint typecheck pytest  ## Install test needs, then run every check

$(BIN)/python:
	$(PY) -m venv $(VENV)

venv: $(BIN)/python
	$(BIN)/pip install -q -e .

test-venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

# Front-end libraries come from npm at set-up time; none is committed.
assets: $(VENDOR)/.stamp
$(VENDOR)/.stamp: package.json package-lock.json scripts/copy_assets.py
	npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python scripts/copy_assets.py
	touch $@

# Debian packages the tests drive for real: git, bubblewrap (+ slirp4netns, nftables and
# iproute2 for sandbox networking), Chromium, skopeo.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in git bubblewrap slirp4netns nftables iproute2 chromium chromium-driver skopeo; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	fi

lint:
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) node_modules $(VENDOR)
