# The two commands of the README: `make quickstart` and `make test`. Both set everything up on a fresh machine:
# a virtualenv at .venv, the CPU build of torch when no torch is there, offscreen-rendering libraries (apt, when
# available and root), the package with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 is a CPU build on this project's machines. Elsewhere, to get the CPU build rather than PyPI's
# CUDA one: make quickstart TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= metaworld,pusht,interop,dev
# pytest-xdist workers: 2 cores.
TEST_WORKERS ?= 2

.PHONY: quickstart test test-slow setup system-deps lint bench clean

quickstart: setup
	$(BIN)/robopolicy quickstart

test: setup
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -n $(TEST_WORKERS) -q --durations=15

test-slow: setup
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -n $(TEST_WORKERS) -q -m slow

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	@$(MAKE) --no-print-directory system-deps
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# MuJoCo renders camera images offscreen through EGL or OSMesa.
system-deps:
	@if ldconfig -p 2>/dev/null | grep -q libOSMesa && ldconfig -p 2>/dev/null | grep -q libEGL.so; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing offscreen rendering libraries (libosmesa6 libegl1 libgl1)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libegl1 libgl1 >/dev/null) \
		|| echo "warning: could not install libosmesa6/libegl1/libgl1: camera images will not render"; \
	else echo "note: install libosmesa6 libegl1 libgl1 (or a GPU EGL driver) for camera images"; fi

lint: setup
	$(BIN)/ruff check robopolicy sim real tests benchmarks

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
