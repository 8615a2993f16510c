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
EXTRAS ?= metaworld,pusht,interop,so100,vla,scale,view,dev
# pytest-xdist workers: 2 cores.
TEST_WORKERS ?= 2

.PHONY: quickstart test test-slow setup lerobot-env robot-env system-deps lint bench clean

quickstart: setup
	$(BIN)/robopolicy quickstart

# The import contracts and ruff first (`make lint`): a broken layer fails in seconds, before the tests start.
test: lint lerobot-env robot-env
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -n $(TEST_WORKERS) -q --durations=15

test-slow: setup lerobot-env
	MUJOCO_GL=$${MUJOCO_GL:-egl} $(BIN)/python -m pytest -n $(TEST_WORKERS) -q -m slow

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	@$(MAKE) --no-print-directory system-deps
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# LeRobot 0.4.4 in its own virtualenv (it pins torch < 2.11 and needs torchvision): the interoperability tests
# and benchmarks run LeRobot's own loader and writer there, side by side with ours. Our package never imports it.
LEROBOT_VENV := .venv-lerobot
lerobot-env: $(LEROBOT_VENV)/.installed

$(LEROBOT_VENV)/.installed:
	$(PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(LEROBOT_VENV)/bin/pip install -q --no-deps lerobot==0.4.4
	$(LEROBOT_VENV)/bin/pip install -q "datasets<5" "diffusers<0.36" "huggingface-hub<0.36" accelerate einops \
		"opencv-python-headless<4.13" "av<16" jsonlines "packaging<26" pyserial draccus==0.10.0 gymnasium "deepdiff<9" \
		"imageio[ffmpeg]" termcolor "setuptools<81" pynput torchcodec==0.13.0
	# LeRobot's motor buses (robot=so100/so101/koch), our robot side (pyproject's `real` extra) and pytest for
	# tests/test_so100.py, which runs the SO-100 twin tests here
	$(LEROBOT_VENV)/bin/pip install -q feetech-servo-sdk==1.0.0 "dynamixel-sdk<3.9" pyserial pytest \
		$$($(LEROBOT_VENV)/bin/python -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['real']))")
	@touch $@

# The robot computer's side in its own virtualenv: only pyproject's `real` extra (no torch, no MuJoCo, no hydra),
# the package itself without its dependencies. tests/test_robot_env.py deploys from it against a policy server.
ROBOT_VENV := .venv-robot
robot-env: $(ROBOT_VENV)/.installed

$(ROBOT_VENV)/.installed: pyproject.toml
	rm -rf $(ROBOT_VENV) && $(PYTHON) -m venv $(ROBOT_VENV)
	$(ROBOT_VENV)/bin/pip install -q $$($(ROBOT_VENV)/bin/python -c "import tomllib; \
		print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['real']))")
	$(ROBOT_VENV)/bin/pip install -q --no-deps -e .
	@touch $@

# MuJoCo renders camera images offscreen through EGL or OSMesa; ffmpeg decodes LeRobot's videos (torchcodec).
SYSTEM_PACKAGES := libosmesa6 libegl1 libgl1 ffmpeg
system-deps:
	@if ldconfig -p 2>/dev/null | grep -q libOSMesa && ldconfig -p 2>/dev/null | grep -q libEGL.so \
		&& command -v ffmpeg >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing $(SYSTEM_PACKAGES)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null) \
		|| echo "warning: could not install $(SYSTEM_PACKAGES): camera images or LeRobot videos may not work"; \
	else echo "note: install $(SYSTEM_PACKAGES) (or a GPU EGL driver) for camera images and LeRobot videos"; fi

# ruff, and import-linter's contracts in pyproject.toml (the layers, the robot side, no cycles)
lint: setup
	$(BIN)/ruff check robopolicy sim real tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(LEROBOT_VENV) $(ROBOT_VENV) .pytest_cache .ruff_cache
