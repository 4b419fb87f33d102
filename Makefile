# The README's two commands: `make demo` and `make test`. Each creates the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines this project is developed and tested on install this torch from local disk; on a GPU
# machine pass TORCH_SPEC=torch (or any build you prefer): pyproject.toml itself accepts torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m hf_lora_recipe.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# Multi-process launches and real signals (SIGKILL/SIGTERM resume): CI runs them after `make test`.
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m slow

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/preprocess.py

clean:
	rm -rf $(VENV) demo_output outputs
