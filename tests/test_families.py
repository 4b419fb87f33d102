"""The family matrix: the seed recipe, unchanged, on a tiny random base of every supported architecture family.

Each family trains two QLoRA steps (NF4 base, the seed's dropout) with the seed's target intent, and then:
the intent resolved to the family's own projections (MoE experts as parameters, the router frozen), logged and
recorded; the adapter reloads with PeftModel.from_pretrained and gives the trained logits; merge gives them too;
plan's counts equal the model's; the untrained-token guard ran on the family's embedding.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hf_lora_recipe.devtools.tiny_families import FAMILIES, build_tiny_family

from .conftest import shared_asset
from .fixtures import probe_logits, train_capturing_logits
from .test_resilience import _args


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# family -> (modules, parameters) the seed's intent must resolve to: written from each family's modeling code
INTENDED = {
    "llama": (SEVEN, []),
    "mistral": (SEVEN, []),
    "qwen2": (SEVEN, []),
    "qwen3": (SEVEN, []),
    "gemma2": (SEVEN, []),
    "gemma3": (SEVEN, []),
    "olmo2": (SEVEN, []),
    "phi3": (["o_proj", "qkv_proj", "gate_up_proj", "down_proj"], []),
    "gpt_neox": (["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], []),
    "qwen3_moe": (SEVEN[:4], EXPERTS),
    "mixtral": (SEVEN[:4], EXPERTS),
    "gpt_oss": (SEVEN[:4], EXPERTS),
}
assert set(INTENDED) == set(FAMILIES)
# transformers picks Qwen2's tokenizer class from config.json whatever tokenizer_config.json says, so a Qwen2 base
# gets the byte-level BPE tokenizer it is built for; GPT-NeoX its own
TOKENIZERS = {"qwen2": "gpt-neox-20b", "gpt_neox": "gpt-neox-20b"}


def _adapted(model) -> set[str]:
    """Every module (or module.parameter) carrying a LoRA adapter, by its name inside a decoder layer."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            inner = name.replace(".base_layer", "").split(".layers.", 1)[1].split(".", 1)[1]
            found.add(f"{inner}.{module.parameter_name}" if isinstance(module, ParamWrapper) else inner)
    return found


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_seed_recipe_trains_reloads_merges_and_plans_on_every_family(
    family, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.model.loading import load_base_model, model_config, prepare_base
    from hf_lora_recipe.planning.estimates import measure_shape
    from hf_lora_recipe.recipe.schema import Recipe, load_recipe
    from hf_lora_recipe.shipping.merging import load_merge_base, merge
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(shared_asset(f"tokenizers/{TOKENIZERS.get(family, 'llama2')}")))
    base = build_tiny_family(family, tokenizer, tmp_path / "base")
    output_dir = tmp_path / "adapter"
    seed = Recipe()
    flags = [*_args(base, alpaca_path, output_dir, "--max_steps", "2")]
    # the seed's QLoRA and dropout, unchanged; only sizes and steps are the tests'
    flags[flags.index("--load_in_4bit") + 1] = str(seed.load_in_4bit).lower()
    flags[flags.index("--lora_dropout") + 1] = str(seed.lora_dropout)
    code, trained_logits = train_capturing_logits(monkeypatch, flags)
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    modules, parameters = INTENDED[family]

    # the intent, resolved to this family's projections, logged and recorded
    assert f"every attention and MLP projection is {', '.join(modules)}" in out
    assert ("experts as parameters: " + ", ".join(parameters) in out) == bool(parameters)
    recorded = yaml.safe_load((output_dir / "recipe.yaml").read_text())
    assert (recorded["lora_target_modules"], recorded["lora_target_parameters"]) == (modules, parameters)
    saved = json.loads((output_dir / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == set(modules) and set(saved["target_parameters"] or []) == set(parameters)
    assert "chat template tokens" in out and "not checked" not in out  # the guard read this family's embedding
    card = (output_dir / "README.md").read_text()
    assert all(name in card for name in modules + parameters)

    # exactly the intended modules and parameters carry adapters: never the router, norms, embeddings or head
    recipe = load_recipe(output_dir / "recipe.yaml")
    # the base as training prepared it (norms kept in bf16 on a 4-bit base), the adapter in the dtype it trained in
    base_model = prepare_base(load_base_model(recipe), recipe)
    reloaded = PeftModel.from_pretrained(base_model, output_dir, autocast_adapter_dtype=False)
    adapted = _adapted(reloaded)
    assert {a.rsplit(".", 1)[-1] for a in adapted if a not in parameters} == set(modules)
    assert {a for a in adapted if a in parameters} == set(parameters)
    assert not [a for a in adapted if a.rsplit(".", 1)[-1] in ("gate", "router") or "norm" in a]
    assert (probe_logits(reloaded) - trained_logits).abs().max() < 1e-5

    # merge (into the dequantized NF4 base, the default for QLoRA) gives the adapter's logits on the weights it
    # trained against; the NF4 base's own bf16 compute differs from any dense fp32 model by far more than merging
    merged = merge(str(output_dir), tmp_path / "merged", dtype="float32")
    merged_logits = probe_logits(AutoModelForCausalLM.from_pretrained(merged))
    dense_base = load_merge_base(str(base), recipe, "dequantized", torch.float32)
    on_dense = probe_logits(PeftModel.from_pretrained(dense_base, output_dir).float())
    assert (merged_logits - on_dense).abs().max() < 1e-4  # the same weights, summed once: fp32 rounding

    # plan's counts are the model's: the fp32 base with this adapter, each tied weight once
    shape = measure_shape(model_config(recipe), recipe)
    on_fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output_dir)
    assert shape.total == sum(p.numel() for p in on_fp32.parameters())
    assert shape.trainable == sum(p.numel() for n, p in on_fp32.named_parameters() if ".lora_" in n)
    # and plan's explanation of it: r x (in + out) x experts x modules per adapted type, adding up
    for key, dims in shape.lora_dims.items():
        assert (
            shape.lora_by_module[key]
            == recipe.lora_r * (dims.in_features + dims.out_features) * dims.experts * dims.modules
        )
    assert sum(shape.lora_by_module.values()) == shape.trainable


def test_a_target_parameter_that_matches_nothing_is_one_line(llama2_tokenizer, tmp_path):
    from hf_lora_recipe.planning.estimates import BaseOnMeta
    from hf_lora_recipe.recipe.schema import Recipe, RecipeError

    base = build_tiny_family("mixtral", llama2_tokenizer, tmp_path / "base")
    recipe = Recipe(model_name_or_path=str(base), lora_target_parameters=["mlp.experts.up_proj"])
    resolved = BaseOnMeta(recipe).resolved_recipe()
    assert resolved.lora_target_parameters == ["mlp.experts.up_proj"]  # named by the user: kept literally
    with pytest.raises(
        RecipeError,
        match=r"^lora_target_parameters: mlp.experts.up_proj matches no parameter of "
        r"MixtralForCausalLM; 3-D parameters there: mlp.experts.down_proj, mlp.experts.gate_up_proj$",
    ):
        BaseOnMeta(resolved).targets


def test_moe_adapters_take_the_recipes_dropout_on_modules_and_none_on_experts(llama2_tokenizer, tmp_path):
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.recipe.schema import Recipe

    base = build_tiny_family("qwen3_moe", llama2_tokenizer, tmp_path / "base")
    recipe = Recipe(model_name_or_path=str(base), load_in_4bit=False, bf16=False)
    model = add_adapter(AutoModelForCausalLM.from_pretrained(base), recipe)
    assert model.peft_config["default"].lora_dropout == 0  # what PEFT reloads: it refuses dropout on parameters
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    on_modules = [m.lora_dropout["default"] for m in layers if not isinstance(m, ParamWrapper)]
    on_experts = [m.lora_dropout["default"] for m in layers if isinstance(m, ParamWrapper)]
    assert on_modules and all(isinstance(d, torch.nn.Dropout) and d.p == recipe.lora_dropout for d in on_modules)
    assert on_experts and all(isinstance(d, torch.nn.Identity) for d in on_experts)
