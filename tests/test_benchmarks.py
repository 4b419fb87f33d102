"""The benchmark scripts keep working: each runs here at a tiny size (figures are not asserted: no timing in tests)."""

from __future__ import annotations

import pytest

from .conftest import PYTHON, REPO_ROOT, run_cli, shared_asset


@pytest.mark.slow  # five model builds and training loops: a script check, not package behaviour
def test_gpu_throughput_script_runs_on_cpu_at_a_tiny_shape(tmp_path):
    config = shared_asset("model_configs/llama-3-8b")
    out = tmp_path / "table.md"
    result = run_cli(PYTHON, str(REPO_ROOT / "benchmarks" / "gpu_throughput.py"), "--tiny", "--variants",
                     "--model_config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    for row in ("| 1 x 64 |", "| 2 x 64 |", "| 4 x 64 |", "| QLoRA, no checkpointing |", "| QLoRA, model cross-entropy instead of TRL's fused LM head |", "| QLoRA, embeddings/norms/LM head kept bf16 (kbit_upcast_fp32: false) |", "| bf16 LoRA, checkpointing |"):
        assert row in table
