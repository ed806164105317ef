# Kiln's two set-up commands: `make up` runs Kiln, `make test` runs every check.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENDOR := src/kiln/web/static/vendor

.PHONY: up test test-deps python-test-deps venv test-venv assets runtime-deps system-deps postgres go-tools base-image lint typecheck pytest clean

up: runtime-deps venv assets  ## Install Kiln and run it on its embedded defaults
	$(BIN)/kiln up

test: system-deps test-deps lint typecheck pytest  ## Install test needs, then run every check

# The Go tools' build (minutes of CPU on a fresh machine) runs beside the rest of the set-up
# (PostgreSQL, the virtual environment, npm, the base image: mostly network and disk).
test-deps:
	$(MAKE) -j2 go-tools python-test-deps

python-test-deps:
	$(MAKE) -j1 postgres test-venv assets base-image

$(BIN)/python:
	$(PY) -m venv $(VENV)

venv: $(BIN)/python
	$(BIN)/pip install -q -e .

test-venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

# Front-end libraries come from npm at set-up time; none is committed. Kiln's own modules in
# frontend/ are bundled with them by esbuild (from npm too).
assets: $(VENDOR)/.stamp
$(VENDOR)/.stamp: package.json package-lock.json scripts/copy_assets.py $(wildcard frontend/*.js)
	npm ci --no-audit --no-fund --loglevel=error --include=dev
	$(BIN)/python scripts/copy_assets.py
	touch $@

# Debian packages, installed when running as root with apt: what Kiln itself runs (git for
# projects; e2fsprogs for each project's own filesystem, its disk quota; bubblewrap,
# slirp4netns, nftables, iproute2 for the runner's sandboxes and server-side git; mmdebstrap
# for the builder's base image) and, for the tests, Chromium, the OCI clients skopeo and
# podman (with runc, which podman runs containers with here; built images must run in a real
# engine), docker-registry (the CNCF registry: a peer to push builds to), procps
# (pgrep/pkill: the chaos tests find services), and curl and unzip
# (scripts/build_go_tools.sh fetches a Go toolchain with them where there is none); wrk drives
# bench/app_proxy.py.
RUNTIME_DEBS := git bubblewrap slirp4netns nftables iproute2 e2fsprogs mmdebstrap
TEST_DEBS := $(RUNTIME_DEBS) procps chromium chromium-driver skopeo podman runc docker-registry curl unzip wrk
define apt_install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  fi; \
	fi
endef

runtime-deps:
	$(call apt_install,$(RUNTIME_DEBS))

system-deps:
	$(call apt_install,$(TEST_DEBS))

# No database server runs on a fresh machine: install and start PostgreSQL for its tests.
postgres:
	scripts/ensure_postgres.sh

# Test tools no Debian or PyPI package ships (crane, oras, the OCI conformance suite; the
# Kubernetes test control plane: kube-apiserver/controller-manager/scheduler, etcd, KWOK,
# Helm), built from their Go modules at pinned versions into a cache outside the
# repository, once each. A cold build of all seven (empty Go module and build caches) took
# 16.5 min on this 2-core machine shared with other work (load ~6; 18 CPU-minutes, so about
# 10 min on 2 idle cores; 26.6 min in an earlier run at load 7-8), the kube binary 9 of them.
# Without Go, the script fetches it first; under CI=true anything missing fails here.
go-tools:
	scripts/build_go_tools.sh

# Kiln's Debian base image for the build tests: made once per recipe (a minute or two, from
# Debian's mirror) into ${KILN_TOOLS_CACHE:-~/.cache/kiln-tools}/base-images, then reused.
base-image:
	$(BIN)/python -m kiln.testing.base_image

lint:
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) node_modules $(VENDOR)
