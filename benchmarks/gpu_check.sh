#!/usr/bin/env bash
# The GPU check for one device window, on the device image as it is (Python 3.12, torch 2.11, transformers 5.17,
# accelerate 1.15; no TRL, bitsandbytes or datasets). Here: `make gpu-wheels` fills .gpu/ (the wheels the image
# lacks, and ../shared); on the device, with .gpu carried:
#
#     bash benchmarks/gpu_check.sh                 # results in $OUT (or benchmarks/out)
#
# It installs the carried wheels (--no-index --no-deps --target), runs the GPU exactness tests, then the speed
# variants of benchmarks/gpu_throughput.py, most informative first, and stops starting variants at the deadline.
# Every result is one JSON line in $OUT/gpu_check.jsonl (install, each test) or $OUT/gpu_throughput.jsonl (each
# variant), written as it is known: a run cut off still returns what it reached. `make gpu-rehearsal` runs this
# script on the CPU with the image's versions, so a GPU window spends no time on version errors.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
: > "$RESULTS"
PY="${PYTHON:-python3}"
WHEELS="${GPU_WHEELS_DIR:-.gpu/wheels}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check-site}"
# seconds after which no further speed variant starts (the window is ~15 minutes with start-up; the check aims at 8)
DEADLINE_S="${GPU_CHECK_DEADLINE_S:-330}"
VARIANTS="seed (micro-batch 4;per_device_train_batch_size auto;compile;Alpaca lengths, padded;Alpaca lengths, padding-free, varlen"
VARIANTS+=";use_liger_kernel;all:;seed, TRL;activation_offloading;Alpaca lengths, padding-free, flex;memory-lean;seed again"

say() { "$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' "$@" >> "$RESULTS"; }

started=$SECONDS
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl; then
  say step install outcome failed
  exit 1
fi
say step install outcome passed seconds "$((SECONDS - started))"
SHARED="${GPU_CHECK_SHARED:-.gpu/shared}"
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 HF_LORA_RECIPE_SHARED="$PWD/$SHARED" PYTHONUNBUFFERED=1
"$PY" -c 'import torch, transformers, accelerate, trl, peft, bitsandbytes, datasets, hf_lora_recipe.pipeline.train_run
print(f"torch {torch.__version__} cuda {torch.cuda.is_available()}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, datasets {datasets.__version__}")' \
  || { say step imports outcome failed; exit 1; }
say step imports outcome passed

tests_started=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider -p tests.jsonl_report --jsonl "$RESULTS" \
  tests/test_gpu.py tests/test_speed_exactness.py tests/test_compile.py
say step exactness-tests exit "$?" seconds "$((SECONDS - tests_started))"

remaining=$((DEADLINE_S - (SECONDS - started)))
"$PY" benchmarks/gpu_throughput.py --model_config "$SHARED/model_configs/llama-3-8b" --out_dir "$OUT" \
  --only "$VARIANTS" --deadline_s "$((remaining > 0 ? remaining : 0))" ${GPU_CHECK_TINY:+--tiny}
say step speed-variants exit "$?" seconds "$((SECONDS - started))"
