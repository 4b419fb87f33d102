from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_lora_recipe.recipe.cli_args import RecipeParser
from hf_lora_recipe.recipe.schema import (
    LLAMA_PROJECTIONS,
    SEED_TARGET_MODULES,
    Recipe,
    RecipeError,
    dump_recipe,
    gradient_accumulation_steps,
    load_recipe,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> Recipe:
    return RecipeParser("train", "test").parse_recipe(argv)[0]


def test_defaults_are_the_seed_recipe():
    recipe = Recipe()
    assert (recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout) == (16, 32, 0.05)
    assert recipe.lora_target_modules == ["all-projections"]  # resolved per architecture: tests/test_families.py
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
    recipe = parse(["--config", str(path), "--learning_rate", "2e-4", "--bf16=false"])
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
        parse(["--learning_rat", "1e-4"])


def test_gradient_accumulation_is_derived_never_typed(tmp_path):
    with pytest.raises(RecipeError, match="derived"):
        parse(["--gradient_accumulation_steps", "8"])


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
    expected = Recipe(output_dir=str(Path.cwd() / "outputs" / "llama3-8b-alpaca-qlora"))  # made absolute once, on load
    assert recipe == expected
    assert recipe.model_name_or_path == "meta-llama/Meta-Llama-3-8B" and recipe.dataset_name == "tatsu-lab/alpaca"
    assert recipe.lora_target_modules == SEED_TARGET_MODULES


def test_resolved_recipe_round_trips_with_derived_values(tmp_path):
    recipe = load_recipe(None, {"lora_r": 8})
    dump_recipe(recipe, tmp_path / "recipe.yaml", gradient_accumulation_steps=32, world_size=1)
    written = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert written["derived"] == {"gradient_accumulation_steps": 32, "world_size": 1}
    assert load_recipe(tmp_path / "recipe.yaml") == recipe


# TRL's own documented command lines (docs: "PEFT integration" quick start and the `trl sft` flag table),
# with `python trl/scripts/sft.py` / `trl sft` replaced by our command.
TRL_COMMAND_LINES = [
    "--model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --use_peft --lora_r 32 --lora_alpha 16 "
    "--lora_dropout 0.05 --output_dir Qwen2-0.5B-SFT-LoRA",
    "--model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name stanfordnlp/imdb --load_in_4bit --bnb_4bit_quant_type nf4 "
    "--use_peft --lora_target_modules q_proj v_proj --learning_rate 2.0e-4 --num_train_epochs 1 "
    "--per_device_train_batch_size 2 --eval_steps 100 --report_to tensorboard --push_to_hub --hub_model_id me/imdb-lora",
]


@pytest.mark.parametrize("line", TRL_COMMAND_LINES)
def test_trl_style_command_lines_parse(line):
    recipe = parse(line.split())
    assert recipe.model_name_or_path.startswith("Qwen/")
    if "q_proj v_proj" in line:
        assert recipe.lora_target_modules == ["q_proj", "v_proj"]  # nargs="+", TRL's syntax
        assert recipe.push_to_hub is True and recipe.load_in_4bit is True  # bare booleans
        assert recipe.report_to == ["tensorboard"] and recipe.num_train_epochs == 1.0
    else:
        assert (recipe.lora_r, recipe.lora_alpha, recipe.output_dir) == (
            32,
            16,
            str(Path.cwd() / "Qwen2-0.5B-SFT-LoRA"),
        )


def test_flag_forms_lists_booleans_and_yaml_precedence(tmp_path):
    assert parse(["--lora_target_modules", "q_proj,k_proj"]).lora_target_modules == ["q_proj", "k_proj"]
    assert parse(["--lora_target_modules", "q_proj,", "k_proj"]).lora_target_modules == ["q_proj", "k_proj"]
    assert parse(["--oasst_languages", "en", "de"]).oasst_languages == ["en", "de"]
    assert parse(["--bf16", "false", "--push_to_hub", "--hub_model_id", "me/x"]).push_to_hub is True
    assert parse(["--bf16", "no"]).bf16 is False and parse(["--gradient_checkpointing"]).gradient_checkpointing is True
    path = tmp_path / "r.yaml"
    path.write_text("lora_r: 8\nbf16: false\nreport_to: none\n")
    recipe = parse(["--config", str(path)])
    assert (recipe.lora_r, recipe.bf16, recipe.report_to) == (8, False, ["none"])  # flags not given keep the YAML's
    assert parse(["--config", str(path), "--bf16"]).bf16 is True
    with pytest.raises(RecipeError, match="use_peft false"):
        parse(["--use_peft", "false"])
    with pytest.raises(RecipeError, match="expected one argument"):
        parse(["--lora_r"])
    with pytest.raises(RecipeError, match="unexpected argument 'v_proj'"):
        parse(["--lora_r", "8", "v_proj"])


def test_all_linear_reaches_peft_as_peft_means_it(tiny_base):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_lora_recipe.inits.adapter import lora_config

    recipe = parse(["--lora_target_modules", "all-linear"])
    assert lora_config(recipe).target_modules == "all-linear"
    model = get_peft_model(
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_base)), lora_config(recipe)
    )
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(LLAMA_PROJECTIONS)  # every linear layer of the decoder; never the LM head
    with pytest.raises(RecipeError, match="give it alone"):
        parse(["--lora_target_modules", "all-linear", "q_proj"])


def test_yaml_duplicate_keys_and_syntax_errors_name_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("lora_r: 8\nlearning_rate: 1.0e-4\nlora_r: 32\n")
    with pytest.raises(RecipeError, match=r"dup.yaml: line 3: key 'lora_r' is given twice"):
        load_recipe(path)
    path.write_text("lora_r: 8\nlora_alpha: [16\n")
    with pytest.raises(RecipeError, match=r"dup.yaml: line \d+, column \d+: invalid YAML"):
        load_recipe(path)


def test_help_is_grouped_and_documented():
    from hf_lora_recipe.recipe.schema import FIELDS, GROUPS

    text = RecipeParser("train", "test").format_help()
    for title in GROUPS:
        assert f"recipe keys: {title}:" in text
    assert all(spec.metadata["help"] for spec in FIELDS.values())
    flat = " ".join(text.split())
    assert "--lora_alpha INT scale numerator; 2r (alpha == r under-uses the adapter) (default: 32; positive)" in flat
    assert "(default: all-projections)" in flat


def test_sft_config_keys_pass_through_with_the_same_meaning():
    import dataclasses

    from trl import SFTConfig

    from hf_lora_recipe.training.trainer import SFT_CONFIG_KEYS, trainer_config

    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    recipe = Recipe(learning_rate=1.5e-4, save_total_limit=5, report_to=["none"])
    config = trainer_config(recipe, accumulation=32)
    for key in SFT_CONFIG_KEYS:
        assert key in sft_fields
        if key not in ("report_to",):
            assert getattr(config, key) == getattr(recipe, key), key
    assert config.gradient_accumulation_steps == 32 and config.report_to == []


def test_every_numeric_key_declares_its_bounds():
    """A new int or float key cannot forget its range: validate checks each declared one at load."""
    from hf_lora_recipe.recipe.schema import FIELDS, Bounds, field_type

    numeric = [name for name in FIELDS if field_type(name)[0] in (int, float)]
    assert len(numeric) >= 20
    missing = [name for name in numeric if not isinstance(FIELDS[name].metadata.get("bounds"), Bounds)]
    assert missing == []
    for name in numeric:  # the seed's own values are inside their bounds
        default = FIELDS[name].default
        assert default is None or FIELDS[name].metadata["bounds"].holds(default), name
