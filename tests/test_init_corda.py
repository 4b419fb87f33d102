"""CorDA (``init_lora_weights: corda``): refused where it cannot work, built from the training data's covariance,
proven at step 0 like every base-rewriting init, and published converted to a plain adapter of the original base."""

from __future__ import annotations

import json

import pytest

from hf_lora_recipe import inits
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, load_recipe_dict

from .test_variants import _lora_layers, _on_original_base, _train


def _recipe(tiny_base, alpaca_path, **values) -> Recipe:
    return Recipe(
        model_name_or_path=str(tiny_base),
        dataset_name=str(alpaca_path),
        load_in_4bit=False,
        bf16=False,
        max_length=64,
        init_lora_weights="corda",
        **values,
    )


def _training_data(recipe):
    from hf_lora_recipe.data.pipeline import train_and_eval
    from hf_lora_recipe.templates.tokenizer import tokenizer_for

    return train_and_eval(recipe, tokenizer_for(recipe))[0]


@pytest.mark.parametrize(
    "values, match",
    [
        ({}, "init_lora_weights: corda rewrites the base weights .* set load_in_4bit false"),  # the seed's base is NF4
        ({"load_in_4bit": False, "use_dora": True}, "corda with use_dora: true is not supported"),
        ({"load_in_4bit": False, "streaming": True, "max_steps": 4}, "corda with streaming: true is not supported"),
    ],
)
def test_corda_is_refused_where_it_cannot_work(values, match):
    with pytest.raises(RecipeError, match=match):
        inits.check_recipe(load_recipe_dict({"init_lora_weights": "corda", **values}))
    with pytest.raises(RecipeError, match="init_lora_weights: corda under FSDP or DeepSpeed is not supported"):
        inits.check_engine(Recipe(load_in_4bit=False, init_lora_weights="corda"), "zero3")


def test_corda_starts_at_the_base_from_the_training_data(tiny_base, alpaca_path):
    """check_variants proves (a) the base rewritten, (b) W_res + s B0 A0 = W, (c) the step-0 logits; and the
    initialisation depends on the data (another half of the rows gives another B0 A0), unlike PiSSA's."""
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import load_base_model

    recipe = _recipe(tiny_base, alpaca_path)
    data = _training_data(recipe)
    model = add_adapter(load_base_model(recipe), recipe, data=data)
    check_variants(model, recipe)
    layers = _lora_layers(model)
    assert len(layers) == 14 and all(layer.lora_B["default"].weight.abs().max() > 0 for layer in layers)

    other = add_adapter(load_base_model(recipe), recipe, data=data.select(range(len(data) // 2, len(data))))
    check_variants(other, recipe)

    def product(layer):
        return layer.lora_B["default"].weight @ layer.lora_A["default"].weight

    difference = (product(_lora_layers(other)[0]) - product(layers[0])).abs().max()
    assert difference > 1e-2 * product(layers[0]).abs().max()

    with pytest.raises(RuntimeError, match="corda needs the tokenized training data"):
        add_adapter(load_base_model(recipe), recipe)


def test_training_with_corda_publishes_a_converted_adapter(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, capsys
):
    output_dir = tmp_path / "adapter"
    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, "--init_lora_weights", "corda")
    assert code == 0
    out = capsys.readouterr().out
    assert "CorDA: every target layer's input covariance from" in out and "init_lora_weights corda: checked" in out
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (32, 64, True)
    assert (_on_original_base(tiny_base, output_dir) - trained).abs().max() < 1e-4
    assert "CorDA init (saved converted: rank 32, alpha 64" in (output_dir / "README.md").read_text()
    assert (output_dir / "initial_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # two trainings in a row
def test_a_corda_resume_rebuilds_the_same_initialisation(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, capsys
):
    output_dir = tmp_path / "adapter"
    flags = ("--init_lora_weights", "corda")
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags)[0] == 0
    capsys.readouterr()
    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "3")
    out = capsys.readouterr().out
    assert code == 0 and "resuming from" in out and "this rerun's initialisation equals" in out
    assert (_on_original_base(tiny_base, output_dir) - trained).abs().max() < 1e-4
    assert json.loads((output_dir / "training_results.json").read_text())["optimizer_steps"] == 3
