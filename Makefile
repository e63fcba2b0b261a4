# saeserve: set-up, serve, test. Every target creates the virtual environment first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv serve test chromium chromium

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is a CPU wheel; an open range would pull a multi-GB CUDA build.
	$(BIN)/pip install --compile -q torch==2.13.0
	$(BIN)/pip install --compile -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# Request headers not complete within SAESERVE_HEADER_TIMEOUT_S (default 10) get HAProxy's 408 (ingress/header_timeout.py).
HEADER_TIMEOUT_ENV := RAY_SERVE_HAPROXY_BINARY_PATH="$(CURDIR)/scripts/haproxy_header_timeout.py"
# Serve kills a proxy that is not ready 5 s after it starts, and `serve run` fails: on a busy machine, 30 s (docs/reliability.md).
PROXY_READY_ENV := RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=$${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-30}

# Serve the bundled demo pack on http://127.0.0.1:8000 (no network needed). SECRET=... turns auth on.
# RAY_SERVE_ENABLE_HA_PROXY=1: Serve's HAProxy ingress (HTTP straight to the ingress replicas; benchmarks/README.md).
# RAY_SERVE_HAPROXY_METRICS_ENABLED=0: the ingress replicas record Serve's HTTP metrics, not HAProxy's log (ingress/haproxy_env.py).
# The venv's bin first on PATH: the Ray that `serve run` starts passes it on, so a `ray job submit -- python ...`
# runs the venv's python (tests/readme/test_readme_commands.py runs the README's job that way).
SERVE_CONFIG ?= serve_config.yaml
serve: venv
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_METRICS_ENABLED=$${RAY_SERVE_HAPROXY_METRICS_ENABLED:-0} $(HEADER_TIMEOUT_ENV) $(PROXY_READY_ENV) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/serve run $(SERVE_CONFIG)

test: venv chromium
	HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q tests

# Debian's Chromium and ChromeDriver for the playground's browser test (tests/service/test_playground.py), if missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  echo "installing Debian's chromium and chromium-driver (the playground's browser test)"; \
	  timeout 300 $(SUDO) apt-get update -q && timeout 600 $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
	  || echo "could not install chromium: the playground's browser test will skip"; }

# Rebuild the trained demo pack models/demo-lm from scratch (seeded; ~10 min on an idle CPU core) and its README section (models/demo-lm/README.md).
.PHONY: demo-pack
demo-pack: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m scripts.demo_pack.build
