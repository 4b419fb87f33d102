from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_lora_recipe.config import (
    SEED_TARGET_MODULES,
    Recipe,
    RecipeError,
    dump_recipe,
    gradient_accumulation_steps,
    load_recipe,
    parse_cli_overrides,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_seed_recipe():
    recipe = Recipe()
    assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout) == (16, 32, 0.05)
    assert recipe.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (recipe.adam_beta1, recipe.adam_beta2, recipe.weight_decay) == (0.9, 0.999, 0.0)
    assert (recipe.learning_rate, recipe.lr_scheduler_type, recipe.num_train_epochs) == (3e-4, "cosine", 3.0)
    assert (recipe.global_batch_size, recipe.per_device_train_batch_size) == (128, 4)
    assert recipe.bf16 and recipe.gradient_checkpointing and recipe.max_grad_norm == 1.0
    assert recipe.load_in_4bit and recipe.bnb_4bit_quant_type == "nf4" and recipe.use_bnb_nested_quant
    assert recipe.bnb_4bit_compute_dtype == "bfloat16" and recipe.bnb_4bit_quant_storage == "bfloat16"
    assert recipe.trust_remote_code is False


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora_r: 8\nlearning_rate: 1.0e-4\nlora_target_modules: [q_proj, v_proj]\n")
    config_path, overrides = parse_cli_overrides(["--config", str(path), "--learning_rate", "2e-4", "--bf16=false"])
    recipe = load_recipe(config_path, overrides)
    assert recipe.lora_r == 8  # from YAML
    assert recipe.learning_rate == 2e-4  # CLI beats YAML
    assert recipe.bf16 is False  # CLI beats default
    assert recipe.lora_alpha == 32  # default kept
    assert recipe.lora_target_modules == ["q_proj", "v_proj"]
    assert load_recipe(None, {"lora_target_modules": "q_proj,k_proj"}).lora_target_modules == ["q_proj", "k_proj"]


def test_unknown_yaml_key_names_it_and_the_nearest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lora_rank: 8\n")
    with pytest.raises(RecipeError, match=r"'lora_rank'.*did you mean 'lora_r'"):
        load_recipe(path)


def test_unknown_cli_key_names_it_and_the_nearest():
    with pytest.raises(RecipeError, match=r"'learning_rat'.*did you mean 'learning_rate'"):
        parse_cli_overrides(["--learning_rat", "1e-4"])


def test_gradient_accumulation_is_derived_never_typed(tmp_path):
    with pytest.raises(RecipeError, match="derived"):
        parse_cli_overrides(["--gradient_accumulation_steps", "8"])


def test_bad_values_are_rejected():
    with pytest.raises(RecipeError, match="lora_r"):
        load_recipe(None, {"lora_r": "sixteen"})
    with pytest.raises(RecipeError, match="dataset_format"):
        load_recipe(None, {"dataset_format": "sharegpt"})


@pytest.mark.parametrize("world_size, expected", [(1, 32), (2, 16), (4, 8), (8, 4)])
def test_gradient_accumulation_for_world_sizes(world_size, expected):
    assert gradient_accumulation_steps(Recipe(), world_size) == expected


def test_indivisible_global_batch_is_an_error():
    with pytest.raises(RecipeError, match="not a whole multiple"):
        gradient_accumulation_steps(Recipe(global_batch_size=128, per_device_train_batch_size=4), world_size=3)
    with pytest.raises(RecipeError, match="not a whole multiple"):
        load_recipe(None, {"global_batch_size": 100, "per_device_train_batch_size": 8})


SHIPPED_RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    names = {path.name for path in SHIPPED_RECIPES}
    assert {"llama3-8b-alpaca-qlora.yaml", "tiny-demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_starts_with_a_launch_header(path):
    load_recipe(path)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#")
    assert "hf-lora-recipe" in path.read_text() or "make demo" in path.read_text()


def test_seed_recipe_file_equals_the_defaults():
    recipe = load_recipe(REPO_ROOT / "recipes" / "llama3-8b-alpaca-qlora.yaml")
    expected = Recipe(output_dir="outputs/llama3-8b-alpaca-qlora")
    assert recipe == expected
    assert recipe.model_name_or_path == "meta-llama/Meta-Llama-3-8B" and recipe.dataset_name == "tatsu-lab/alpaca"
    assert recipe.lora_target_modules == SEED_TARGET_MODULES


def test_resolved_recipe_round_trips_with_derived_values(tmp_path):
    recipe = load_recipe(None, {"lora_r": 8})
    dump_recipe(recipe, tmp_path / "recipe.yaml", gradient_accumulation_steps=32, world_size=1)
    written = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert written["derived"] == {"gradient_accumulation_steps": 32, "world_size": 1}
    assert load_recipe(tmp_path / "recipe.yaml") == recipe
