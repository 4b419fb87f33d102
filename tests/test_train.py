"""End to end through the real command lines: one `hf-lora-recipe train` run and one `accelerate launch` run.

The `hf-lora-recipe train` run is the seed recipe pointed at tiny parts, with the things a user adds on top:
TensorBoard and Trackio tracking and a push to a (local, real-HTTP) Hub at the end. Everything a finished run
promises is checked on that one run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_lora_recipe.commands.train import main as train_main
from hf_lora_recipe.recipe.schema import Recipe
from hf_lora_recipe.training.trainer import bf16_state

from .conftest import ACCELERATE, CLI, HUB_TOKEN, REPO_ROOT, run_cli


TOKEN = HUB_TOKEN  # the local Hub's (conftest's `hub` fixture)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_args(tiny_base: Path, alpaca_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "recipes" / "llama3-8b-alpaca-qlora.yaml"),  # the seed, pointed at tiny parts
        "--model_name_or_path",
        str(tiny_base),
        "--dataset_name",
        str(alpaca_path),
        "--max_steps",
        "2",
        "--global_batch_size",
        "8",
        "--max_length",
        "128",
        "--logging_steps",
        "1",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_base, alpaca_path, tmp_path_factory, hub):
    work = tmp_path_factory.mktemp("run")
    base_hash = _sha256(tiny_base / "model.safetensors")
    output_dir = work / "adapter"
    env = {**hub.client_env(cache_dir=work / "hub-cache"), "TRACKIO_DIR": str(work / "trackio")}
    result = run_cli(
        CLI,
        "train",
        *_train_args(
            tiny_base,
            alpaca_path,
            output_dir,
            "--report_to",
            "tensorboard",
            "trackio",
            "--push_to_hub",
            "--hub_model_id",
            "user/seed-tiny",
            "--per_device_train_batch_size",
            "auto",
        ),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result, base_hash, work


def test_train_prints_the_derived_figures(trained):
    _, result, _, _ = trained
    # auto: on a CPU the packed rows are attended per example (attn_implementation auto -> varlen), so no cap
    # below the global batch; the whole batch of 8 fits
    assert re.search(
        r"micro-batch auto -> 8: planned peak [\d.]+ GiB within [\d.]+ GiB \(50% of the available RAM\)", result.stdout
    ), result.stdout
    assert "world size 1 x micro-batch 8 x gradient accumulation 1 = global batch 8" in result.stdout
    assert "attention: varlen; padding-free: True" in result.stdout
    # the speed choices, and a throughput line at every log after the first
    bf16 = bf16_state(Recipe(dataset_name="rows.json"))  # the seed's bf16, as this machine computes it
    assert (
        f"activation offloading: off; compile: off; bf16: {bf16}; MFU against: n/a (no known GPU peak)"
        in result.stdout
    )
    assert re.search(r"step 2: [\d,]+ tokens/s \(this process\)", result.stdout)
    assert "tokens per optimizer step ~" in result.stdout
    assert "trainable: 34,816 / 4.2M (0.83%)" in result.stdout  # 2 layers x 7 projections, r=16, hidden 64


def test_the_console_holds_our_lines_progress_and_metrics_only(trained):
    _, result, _, _ = trained
    for line in (result.stdout + result.stderr).splitlines():
        assert "Warning" not in line and "Traceback" not in line, line
    assert "kernels" not in result.stderr  # bitsandbytes' optional-package notice


def test_artifacts_are_complete_and_safetensors_only(trained):
    output_dir, _, _, _ = trained
    names = {p.name for p in output_dir.iterdir() if p.is_file()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "recipe.yaml",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_results.json",
        "training_loss.png",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    tensors = load_file(output_dir / "adapter_model.safetensors")
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_training_results_are_machine_readable(trained):
    output_dir, _, _, _ = trained
    results = json.loads((output_dir / "training_results.json").read_text())
    for key, value in results.items():
        assert re.fullmatch(r"[a-z0-9_]+", key), key
    assert results["optimizer_steps"] == 2 and isinstance(results["final_train_loss"], float)
    assert results["final_eval_loss"] is None  # no held-out set: null, not a sentence
    assert (
        isinstance(results["tokens_per_epoch"], int)
        and 0 < results["supervised_tokens_per_epoch"] < results["tokens_per_epoch"]
    )
    assert isinstance(results["wall_time_s"], float) and results["libraries"]["trl"]


def test_recipe_yaml_is_resolved_with_the_seed_values_and_derived_accumulation(trained):
    output_dir, _, _, _ = trained
    recipe = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    assert recipe["derived"] == {"gradient_accumulation_steps": 1, "world_size": 1, "engine": "one process"}
    assert recipe["per_device_train_batch_size"] == 8  # auto, as resolved for this run
    assert (recipe["lora_r"], recipe["lora_alpha"], recipe["learning_rate"]) == (16, 32, 3e-4)
    assert recipe["load_in_4bit"] and recipe["use_bnb_nested_quant"] and recipe["bf16"]


def test_model_card_metadata_and_its_load_snippet_runs(trained, capsys):
    output_dir, _, _, _ = trained
    card = (output_dir / "README.md").read_text()
    metadata = yaml.safe_load(re.match(r"^---\n(.*?)\n---", card, re.S).group(1))
    assert metadata["library_name"] == "peft"
    assert {"qlora", "sft", "trl", "hf-lora-recipe"} <= set(metadata["tags"])
    for section in (
        "## Hyperparameters",
        "## Training results",
        "## Prompt template",
        "## Provenance",
        "## How to load",
    ):
        assert section in card
    assert "| final train loss | " in card and "| final eval loss | no held-out set |" in card
    assert "![training loss](training_loss.png)" in card
    assert (output_dir / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    # The snippet loads the base quantized exactly as the recipe did (read back from recipe.yaml).
    assert (
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
        "bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)"
    ) in snippet
    exec(compile(snippet, "model-card-snippet", "exec"), {})  # noqa: S102 - the card's own code must run
    assert capsys.readouterr().out.strip() != ""


def test_tracking_logs_the_runs_loss_offline(trained):
    output_dir, _, _, work = trained
    logged = [
        entry["loss"]
        for entry in json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(logged) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run_dir] = glob.glob(str(output_dir / "runs" / "*"))
    events = EventAccumulator(run_dir)
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2] and [s.value for s in scalars] == pytest.approx(logged)

    [database] = glob.glob(str(work / "trackio" / "*.db"))
    with sqlite3.connect(database) as connection:
        rows = connection.execute("select metrics from metrics order by step").fetchall()
    tracked = [json.loads(metrics)["train/loss"] for (metrics,) in rows if "train/loss" in json.loads(metrics)]
    assert tracked == pytest.approx(logged)


def test_push_to_hub_at_the_end_of_training(trained, hub):
    _, result, _, _ = trained
    assert "pushed to" in result.stdout
    published = set(hub.files("user/seed-tiny"))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "recipe.yaml"} <= published
    assert not [p for p in published if p.startswith(("checkpoint", "runs")) or p.endswith((".bin", ".pt", ".pth"))]


def test_no_token_in_any_file_or_log(trained, hub):
    output_dir, result, _, _ = trained
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in writes)  # it was used
    assert TOKEN not in result.stdout + result.stderr
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_adapter_loads_changes_logits_and_base_is_untouched(trained, tiny_base):
    output_dir, _, base_hash, _ = trained
    assert _sha256(tiny_base / "model.safetensors") == base_hash
    tensors = load_file(output_dir / "adapter_model.safetensors")
    assert any(torch.count_nonzero(t) > 0 for k, t in tensors.items() if "lora_B" in k)  # training moved B
    input_ids = torch.tensor([[1, 518, 25580, 29962, 15043, 518, 29914, 25580, 29962]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = PeftModel.from_pretrained(base, output_dir).eval()
    with torch.no_grad():
        adapted_logits = model(input_ids=input_ids).logits
    assert not torch.allclose(adapted_logits, base_logits)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, reference[name.replace(".base_layer", "")]), name


def test_unknown_keys_train_nothing(tiny_base, alpaca_path, tmp_path, capsys):
    output_dir = tmp_path / "never"
    assert train_main(_train_args(tiny_base, alpaca_path, output_dir, "--lora_rank", "8")) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-lora-recipe: error: unknown recipe key 'lora_rank'") and "did you mean 'lora_r'" in err
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora_r: 8\nlearning_rte: 1.0e-4\n")
    assert train_main(["--config", str(recipe), "--output_dir", str(output_dir)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert train_main(_train_args(tiny_base, alpaca_path, output_dir, "--report_to", "tensorbored")) == 2
    assert "report_to: unknown tracker 'tensorbored'" in capsys.readouterr().err
    assert not output_dir.exists()


@pytest.mark.slow  # a launcher and a second interpreter (~35 s): CI runs it with the other launches
def test_accelerate_launch_path_trains_with_the_same_code(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_cli(
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO_ROOT / "accelerate_configs" / "single_gpu.yaml"),
        "-m",
        "hf_lora_recipe.train",
        *_train_args(
            tiny_base,
            alpaca_path,
            output_dir,
            "--eval_split_size",
            "4",
            "--load_in_4bit",
            "false",
            "--max_length",
            "64",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradient accumulation 2" in result.stdout
    assert "eval_loss" in result.stdout  # the held-out rows are evaluated
    card = (output_dir / "README.md").read_text()
    assert "| final eval loss | " in card and "no held-out set" not in card
    assert isinstance(json.loads((output_dir / "training_results.json").read_text())["final_eval_loss"], float)
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((output_dir / "recipe.yaml").read_text())["derived"]["world_size"] == 1
