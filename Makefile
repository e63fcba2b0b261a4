# saeserve: set-up, serve, test. Every target creates the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv serve test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is a CPU wheel; an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --compile -q torch==2.13.0
	$(BIN)/pip install --compile -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# Request headers not complete within SAESERVE_HEADER_TIMEOUT_S (default 10) get HAProxy's 408 (ingress/header_timeout.py).
HEADER_TIMEOUT_ENV := RAY_SERVE_HAPROXY_BINARY_PATH="$(CURDIR)/scripts/haproxy_header_timeout.py"

# Serve the bundled demo pack on http://127.0.0.1:8000 (no network needed). SECRET=... turns auth on.
# RAY_SERVE_ENABLE_HA_PROXY=1: Serve's HAProxy ingress (HTTP straight to the ingress replicas; README "Performance").
serve: venv
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_SERVE_ENABLE_HA_PROXY=1 $(HEADER_TIMEOUT_ENV) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/serve run serve_config.yaml

test: venv
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

# Rebuild the trained demo pack models/demo-lm from scratch (seeded; ~10 min on an idle CPU core) and its README section.
.PHONY: demo-pack
demo-pack: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m scripts.demo_pack.build
