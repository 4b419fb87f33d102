"""PEFT variants as recipe keys (use_rslora, use_dora, init_lora_weights, loraplus_lr_ratio): each passed to
PEFT, proven to take effect on the built model (or the run stops), counted by plan, recorded in the card,
merged to the adapter's logits; initialisations not offered yet are refused with the reason."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_lora_recipe.config import Recipe, RecipeError, load_recipe_dict

from .conftest import CLI, run_cli
from .fixtures import build_adapter_dir
from .test_resilience import _args

VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "all": {"use_rslora": True, "use_dora": True, "init_lora_weights": "gaussian"},
}


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# every variant on a bf16 base; all of them at once on an NF4 base (PEFT allows each there)
@pytest.mark.parametrize("variant, quantized", [(name, False) for name in VARIANTS] + [("all", True)])
def test_each_variant_is_the_one_peft_built(tiny_base, variant, quantized):
    from hf_lora_recipe.modeling import add_adapter, check_variants, load_base_model

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=quantized, **VARIANTS[variant])
    model = add_adapter(load_base_model(recipe), recipe)
    check_variants(model, recipe)
    layers = _lora_layers(model)
    assert len(layers) == 14
    expected = recipe.lora_alpha / (math.sqrt(recipe.lora_r) if recipe.use_rslora else recipe.lora_r)
    assert all(layer.scaling["default"] == pytest.approx(expected) for layer in layers)  # 8.0 rsLoRA, 2.0 plain
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == (14 if recipe.use_dora else 0) and all(p.requires_grad for p in magnitudes)
    assert all(p.dtype == torch.float32 for p in magnitudes)  # below bf16's resolution otherwise


@pytest.mark.parametrize("asked, match", [
    ({"use_rslora": True}, "LoRA scaling 2, but use_rslora True"),
    ({"use_dora": True}, "use_dora True, but the layer has no trainable DoRA magnitude"),
])
def test_a_variant_peft_did_not_build_stops_the_run(tiny_base, asked, match):
    from hf_lora_recipe.modeling import add_adapter, check_variants, load_base_model

    built = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    model = add_adapter(load_base_model(built), built)  # plain LoRA, as a config that ignored the key would build
    with pytest.raises(RuntimeError, match=match):
        check_variants(model, Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, **asked))
    layer = _lora_layers(model)[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    with pytest.raises(RuntimeError, match="lora_B is not zero at step 0"):
        check_variants(model, built)


def test_loraplus_gives_b_the_ratio_and_a_broken_optimizer_is_caught(tiny_base):
    from peft.optimizers import create_loraplus_optimizer

    from hf_lora_recipe.modeling import add_adapter, load_base_model
    from hf_lora_recipe.trainer import check_loraplus

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    model = add_adapter(load_base_model(recipe), recipe)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    check_loraplus(optimizer, model, 1e-4, 16)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with pytest.raises(RuntimeError, match=r"LoRA\+: .*lora_B.* learns at 0.0001, not 0.0016"):
        check_loraplus(plain, model, 1e-4, 16)


def test_training_with_every_variant_applies_them_end_to_end(tiny_base, alpaca_path, tmp_path):
    """rsLoRA + DoRA + LoRA+ through `train`: the logs say so, the adapter records them, DoRA's magnitudes moved
    off their initial row norms, and the card names the variant."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "adapter"
    result = run_cli(CLI, "train", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "2", "--use_rslora", "true",
                                          "--use_dora", "true", "--loraplus_lr_ratio", "16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA+: lora_B at learning_rate x 16 = 0.016, lora_A at 0.001 (checked per tensor)" in result.stdout
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is True
    adapter = load_file(output_dir / "adapter_model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    magnitude = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    initial = base["model.layers.0.self_attn.q_proj.weight"].float().norm(dim=1)  # B = 0: |W| row by row
    assert magnitude.shape == initial.shape and (magnitude - initial).abs().max() > 1e-5
    card = (output_dir / "README.md").read_text()
    assert "rsLoRA (scaling alpha/sqrt(r)), DoRA (trained magnitudes), LoRA+ (B learning rate x 16)" in card


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_merge_equals_the_adapter_for_each_variant(tiny_base, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.merge import merge

    adapter = build_adapter_dir(tiny_base, tmp_path / "adapter", **VARIANTS[variant])
    assert json.loads((adapter / "adapter_config.json").read_text())[f"use_{variant}"] is True
    inputs = torch.randint(3, 1000, (2, 24))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()(inputs).logits
        merged_dir = merge(str(adapter), tmp_path / "merged", dtype="float32")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(inputs).logits
    assert (adapted - base).abs().max() > 1e-3
    assert (merged - adapted).abs().max() < 1e-4


def test_plan_counts_doras_magnitudes_and_traces_every_variant_key(tiny_base):
    from hf_lora_recipe.estimates import measure_shape
    from hf_lora_recipe.modeling import add_adapter, count_parameters, load_base_model, model_config
    from hf_lora_recipe.plan import traceability

    plain = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    dora = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, use_dora=True, use_rslora=True,
                  loraplus_lr_ratio=16)
    planned = measure_shape(model_config(dora), dora).trainable
    assert planned == count_parameters(add_adapter(load_base_model(dora), dora))[0]
    assert planned - measure_shape(model_config(plain), plain).trainable == 2 * (4 * 64 + 2 * 128 + 64)  # one per output row
    rows = {row["field"]: row for row in traceability(dora)}
    assert rows["LoraConfig.use_dora"]["differs_from_seed"] and rows["LoraConfig.use_rslora"]["differs_from_seed"]
    assert rows["create_loraplus_optimizer.loraplus_lr_ratio"]["value"] == 16
    assert not rows["LoraConfig.init_lora_weights"]["differs_from_library_default"]  # "true" is PEFT's True


@pytest.mark.parametrize("values, match", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights: pissa is not supported yet: it rewrites the base weights"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4 is not supported yet"),
    ({"init_lora_weights": "loftq"}, "needs scipy and a CUDA device"),
    ({"init_lora_weights": "kaiming"}, "init_lora_weights must be one of true, gaussian"),
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be positive"),
    ({"loraplus_lr_ratio": 16, "optim": "adafactor"}, "loraplus_lr_ratio works with optim adamw_torch or adamw_torch_fused"),
])
def test_variant_keys_that_cannot_work_are_refused_with_the_reason(values, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe_dict(values)
