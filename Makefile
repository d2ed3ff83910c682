# visguard developer commands. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# torch/torchvision first and pinned: these releases lie on this machine's disk (see README).
$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]" $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p)))
	touch $@

.PHONY: install demo test bench lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks -q --benchmark-only

lint: $(VENV)/.installed
	$(PY) -m ruff check src plugins tests benchmarks examples
