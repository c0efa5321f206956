# Two commands on a fresh machine (Python >= 3.10, a C++ compiler for torch.compile):
#
#   make suite    # set up .venv, then run the conformance suite: pytest conformance -n auto
#   make test     # set up .venv, then run the harness's own tests: pytest tests -n auto -m "not slow"
#   make test-slow  # the tests that start processes of their own (tests/conftest.py's `slow`); CI runs both
#
# Set-up installs PyTorch's CPU build first, so that no resolver ever picks its CUDA build (several
# GB of NVIDIA packages on Linux), then the project with every framework. Where torch comes from is
# configuration, not code:
#   - PIP_FIND_LINKS set (a local wheel source, as on machines without the wider internet): torch
#     comes from there, through pip's own setting;
#   - otherwise TORCH_INDEX, by default PyTorch's CPU wheel index.
# Override anything on the command line: `make suite TORCH_INDEX= PYTEST_ARGS="--backend torch"`.
# `make clean-venv` removes the environment; set-up runs again only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
ifeq ($(strip $(PIP_FIND_LINKS)),)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
else
TORCH_INDEX ?=
endif
PYTEST_ARGS ?=
BIN = $(VENV)/bin

.PHONY: suite test test-slow setup clean-venv

suite: setup
	$(BIN)/python -m pytest conformance -n auto $(PYTEST_ARGS)

test: setup
	$(BIN)/python -m pytest tests -n auto -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest tests -n auto -m slow $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(strip $(TORCH_INDEX)),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,cpu,jax,trainers]"
	touch $@

clean-venv:
	rm -rf $(VENV)
