"""End to end through the real command lines: `hf-lora-recipe train` and `accelerate launch -m hf_lora_recipe.train`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from .conftest import ACCELERATE, CLI, REPO_ROOT, run_cli

SECRET = "hf_THIS_IS_A_FAKE_TOKEN_123456"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_args(tiny_base: Path, alpaca_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO_ROOT / "recipes" / "llama3-8b-alpaca-qlora.yaml"),  # the seed, pointed at tiny parts
        "--model_name_or_path", str(tiny_base),
        "--dataset_name", str(alpaca_path),
        "--max_steps", "2",
        "--global_batch_size", "8",
        "--max_length", "128",
        "--logging_steps", "1",
        "--output_dir", str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tiny_base, alpaca_path, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("HF_TOKEN", SECRET)  # must never reach a file or a log
    base_hash = _sha256(tiny_base / "model.safetensors")
    output_dir = tmp_path_factory.mktemp("run") / "adapter"
    result = run_cli(CLI, "train", *_train_args(tiny_base, alpaca_path, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result, base_hash


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_train_prints_the_derived_figures(trained):
    _, result, _ = trained
    assert "world size 1 x micro-batch 4 x gradient accumulation 2 = global batch 8" in result.stdout
    assert "tokens per optimizer step ~" in result.stdout
    assert "trainable: 34,816 / 4.2M (0.83%)" in result.stdout  # 2 layers x 7 projections, r=16, hidden 64


def test_artifacts_are_complete_and_safetensors_only(trained):
    output_dir, _, _ = trained
    names = {p.name for p in output_dir.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    tensors = load_file(output_dir / "adapter_model.safetensors")
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_recipe_yaml_is_resolved_with_the_seed_values_and_derived_accumulation(trained):
    output_dir, _, _ = trained
    recipe = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    assert recipe["derived"] == {"gradient_accumulation_steps": 2, "world_size": 1}
    assert (recipe["lora_r"], recipe["lora_alpha"], recipe["learning_rate"]) == (16, 32, 3e-4)
    assert recipe["load_in_4bit"] and recipe["use_bnb_nested_quant"] and recipe["bf16"]
    card = (output_dir / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "peft" and "qlora" in metadata["tags"]


def test_no_token_in_any_file_or_log(trained):
    output_dir, result, _ = trained
    assert SECRET not in result.stdout + result.stderr
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_adapter_loads_changes_logits_and_base_is_untouched(trained, tiny_base):
    output_dir, _, base_hash = trained
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


def test_unknown_key_on_the_command_line_trains_nothing(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "never"
    result = run_cli(CLI, "train", *_train_args(tiny_base, alpaca_path, output_dir, "--lora_rank", "8"))
    assert result.returncode == 2
    assert "unknown recipe key 'lora_rank'" in result.stderr and "did you mean 'lora_r'" in result.stderr
    assert not output_dir.exists()


def test_unknown_key_in_yaml_trains_nothing(tiny_base, alpaca_path, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora_r: 8\nlearning_rte: 1.0e-4\n")
    output_dir = tmp_path / "never"
    result = run_cli(CLI, "train", "--config", str(recipe), "--output_dir", str(output_dir))
    assert result.returncode == 2 and "did you mean 'learning_rate'" in result.stderr
    assert not output_dir.exists()


def test_accelerate_launch_path_trains_with_the_same_code(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_cli(
        ACCELERATE, "launch", "--config_file", str(REPO_ROOT / "accelerate_configs" / "single_gpu.yaml"),
        "-m", "hf_lora_recipe.train", *_train_args(tiny_base, alpaca_path, output_dir, "--eval_split_size", "8"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradient accumulation 2" in result.stdout
    assert "eval_loss" in result.stdout  # the held-out rows are evaluated
    card = (output_dir / "README.md").read_text()
    assert "| final eval loss | " in card and "no held-out set" not in card
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((output_dir / "recipe.yaml").read_text())["derived"]["world_size"] == 1


def test_two_process_launch_rederives_accumulation(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_cli(
        ACCELERATE, "launch", "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
        "--num_processes", "2", "-m", "hf_lora_recipe.train", *_train_args(tiny_base, alpaca_path, output_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2 x micro-batch 4 x gradient accumulation 1 = global batch 8" in result.stdout
    assert result.stdout.count("adapter written to") == 1  # only the main process writes
    assert yaml.safe_load((output_dir / "recipe.yaml").read_text())["derived"] == {
        "gradient_accumulation_steps": 1, "world_size": 2}


def test_indivisible_batch_for_the_launch_fails_before_loading(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_cli(
        ACCELERATE, "launch", "--config_file", str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
        "--num_processes", "2", "-m", "hf_lora_recipe.train",
        *_train_args(tiny_base, alpaca_path, output_dir, "--global_batch_size", "12"),
    )
    assert result.returncode != 0 and "not a whole multiple" in result.stderr
    assert "Loading weights" not in result.stderr and not output_dir.exists()
