"""The benchmark scripts keep working: each runs here at a tiny size (figures are not asserted: no timing in tests)."""

from __future__ import annotations

import json

import pytest

from .conftest import PYTHON, REPO_ROOT, run_cli, shared_asset


@pytest.mark.slow  # a model build and a short training run per variant: a script check, not package behaviour
def test_gpu_throughput_script_runs_every_variant_it_can_on_cpu_at_a_tiny_shape(tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from gpu_throughput import VARIANTS

    config = shared_asset("model_configs/llama-3-8b")
    result = run_cli(
        PYTHON,
        str(REPO_ROOT / "benchmarks" / "gpu_throughput.py"),
        "--tiny",
        "--model_config",
        str(config),
        "--out_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_throughput.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == [variant.name for variant in VARIANTS]
    for variant, row in zip(VARIANTS, rows):
        if variant.needs_cuda:
            assert row["skipped"] == "skipped: needs CUDA"
        else:  # measured, with the plan's figures and the prediction beside it
            assert row["tokens_per_second"] > 0 and row["planned_bytes"] > 0 and row["predicted_speed"], row
    table = (tmp_path / "gpu_throughput.md").read_text()
    assert all(f"| {variant.name} |" in table for variant in VARIANTS)
