"""LoRA dropout on a CPU draws its mask by geometric skipping (training/lora_dropout.py): the same distribution as
``nn.Dropout`` (each element dropped independently with probability p, the rest scaled by 1/(1-p)), the same
gradient, the same masks in a checkpointed layer's recomputation, and only where it applies."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hf_lora_recipe.training.lora_dropout import SkippingDropout, keep_mask, use_skipping_dropout


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_every_element_is_dropped_independently_with_probability_p(p):
    torch.manual_seed(0)
    masks = torch.stack([~keep_mask((64, 250), p) for _ in range(40)]).double()  # True = dropped
    count = masks.numel()
    assert abs(masks.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / count)
    # the ends of the mask (where the gaps start, and where they run out) and a middle element, each over many
    # small masks: dropped with probability p like every other element
    torch.manual_seed(1)
    small = torch.stack([~keep_mask((9, 11), p) for _ in range(4000)]).double().flatten(1)
    for position in (0, 50, 98):
        assert abs(small[:, position].mean().item() - p) < 5 * math.sqrt(p * (1 - p) / 4000), position
    # neighbours uncorrelated (a geometric gap of the wrong law would correlate them)
    flat = masks.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 5 / math.sqrt(flat.numel())


def test_the_output_and_gradient_are_dropouts():
    torch.manual_seed(0)
    values = torch.randn(40, 30, requires_grad=True)
    dropout = SkippingDropout(0.2).train()
    output = dropout(values)
    kept = output != 0
    assert 0.1 < 1 - kept.double().mean().item() < 0.3
    torch.testing.assert_close(output[kept], values[kept] * (1 / 0.8), rtol=0, atol=0)
    grad = torch.randn_like(output)
    output.backward(grad)
    torch.testing.assert_close(values.grad, grad * kept * (1 / 0.8), rtol=0, atol=0)
    assert torch.equal(dropout.eval()(values), values)  # evaluation: the identity
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.2  # what PEFT and our checks read


def test_a_checkpointed_recomputation_redraws_the_forwards_masks():
    """Non-reentrant checkpointing restores the generator's state before recomputing: the backward uses the
    forward's masks, so the gradients equal those without checkpointing (a fresh mask would move them)."""
    layer = torch.nn.Sequential(SkippingDropout(0.5), torch.nn.Linear(16, 16), SkippingDropout(0.5)).train()
    inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def gradient(checkpointed: bool, preserve: bool = True) -> torch.Tensor:
        inputs.grad = None
        torch.manual_seed(3)
        if checkpointed:
            output = checkpoint(layer, inputs, use_reentrant=False, preserve_rng_state=preserve)
        else:
            output = layer(inputs)
        output.pow(2).sum().backward()
        return inputs.grad.clone()

    plain = gradient(checkpointed=False)
    torch.testing.assert_close(gradient(checkpointed=True), plain, rtol=0, atol=0)
    assert (gradient(checkpointed=True, preserve=False) - plain).abs().max() > 1e-3  # the control


def test_the_trainer_uses_it_on_a_cpu_and_compiled_layers_keep_torchs(tiny_base, tmp_path):
    from datasets import Dataset

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.compile_layers import compile_decoder_layers
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer
    from hf_lora_recipe.training.trainer import build_trainer

    recipe = Recipe(
        model_name_or_path=str(tiny_base),
        load_in_4bit=False,
        bf16=False,
        max_steps=1,
        report_to=["none"],
        output_dir=str(tmp_path / "run"),
    )
    model = add_adapter(load_base_model(recipe), recipe)
    dataset = Dataset.from_dict({"input_ids": [[1, 5, 6, 2]], "labels": [[-100, -100, 6, 2]]})
    build_trainer(recipe, model, load_tokenizer(str(tiny_base)), dataset, None, 1, [])
    dropouts = [d for name, d in model.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(type(d) is SkippingDropout and d.p == recipe.lora_dropout for d in dropouts)

    compiled = add_adapter(load_base_model(recipe), recipe)
    compile_decoder_layers(compiled)
    assert use_skipping_dropout(compiled) == 0
