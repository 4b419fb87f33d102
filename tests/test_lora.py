"""The adapter: where it goes, what trains, and that step 0 is exactly the base."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hf_lora_recipe.inits.adapter import add_adapter, lora_config
from hf_lora_recipe.model.architecture import with_projections
from hf_lora_recipe.model.loading import load_base_model, meta_model, model_config, prepare_base, trainable_line
from hf_lora_recipe.recipe.schema import Recipe

from .conftest import shared_asset


SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_config_is_the_seed(tiny_base):
    config = lora_config(
        with_projections(Recipe(), meta_model(model_config(Recipe(model_name_or_path=str(tiny_base))), Recipe()))
    )
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert set(config.target_modules) == SEVEN
    assert config.bias == "none" and config.task_type == "CAUSAL_LM"
    assert not config.modules_to_save


@pytest.fixture(scope="module")
def fp32_recipe(tiny_base):
    return Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False, lora_dropout=0.0)


@pytest.fixture(scope="module")
def nf4_recipe(tiny_base):
    return Recipe(model_name_or_path=str(tiny_base), lora_dropout=0.0, kbit_upcast_fp32=True)


@pytest.fixture(scope="module")
def nf4_bf16_kept_recipe(tiny_base):
    return Recipe(model_name_or_path=str(tiny_base), lora_dropout=0.0, kbit_upcast_fp32=False)


@pytest.mark.parametrize("which", ["fp32_recipe", "nf4_recipe"])
def test_adapters_only_on_the_seven_projections_and_only_lora_trains(which, request):
    recipe = request.getfixturevalue(which)
    model = add_adapter(load_base_model(recipe), recipe)
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == SEVEN
    for name, module in model.named_modules():
        if any(part in name for part in ("embed_tokens", "norm", "lm_head")):
            assert not hasattr(module, "lora_A"), name
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    # 2 layers x (q,k,v,o: 64x64; gate, up: 64->128; down: 128->64) with r=16
    per_layer = 4 * 16 * (64 + 64) + 2 * 16 * (64 + 128) + 16 * (128 + 64)
    assert len(trainable) == 2 * 7 * 2 and sum(model.get_parameter(n).numel() for n in trainable) == 2 * per_layer


@pytest.mark.parametrize("which", ["fp32_recipe", "nf4_recipe", "nf4_bf16_kept_recipe"])
def test_step_zero_logits_are_bit_identical_to_the_base(which, request, llama2_tokenizer):
    recipe = request.getfixturevalue(which)
    torch.manual_seed(0)
    input_ids = torch.randint(3, len(llama2_tokenizer), (2, 24))
    base = prepare_base(load_base_model(recipe), recipe).eval()  # the base as the adapter trains against it
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = get_peft_model(base, lora_config(with_projections(recipe, base))).eval()
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert any(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        adapted_logits = model(input_ids=input_ids).logits
    assert adapted_logits.dtype == base_logits.dtype
    assert torch.equal(adapted_logits, base_logits)
    # and the check can fail: a non-zero B changes the logits
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(0.1)
        assert not torch.equal(model(input_ids=input_ids).logits, base_logits)


def test_trainable_line_for_the_seed_on_llama3_8b():
    from hf_lora_recipe.planning.plan import measure_shape, read_config

    shape = measure_shape(read_config(str(shared_asset("model_configs/llama-3-8b"))), Recipe())
    assert trainable_line(shape.trainable, shape.total) == "trainable: 41.9M / 8030.3M (0.52%)"
