"""Exactness of the GPU-only speed paths (issue 13), for a machine with CUDA: `make gpu-check` runs this file with
test_speed_exactness.py and test_compile.py (which then run on the GPU too) and the throughput benchmark.

Without CUDA every test here is skipped, by design: activation offloading has nothing to move on a CPU, and
PyTorch's varlen kernel exists only for CUDA (its glue is tested on the CPU in test_attention.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from .test_speed_exactness import _one_step, _recipe


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only paths: needs CUDA")


def test_activation_offloading_changes_nothing_but_memory(tiny_base, alpaca_path, tmp_path):
    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    recipe = _recipe(tiny_base, alpaca_path, tmp_path, gradient_checkpointing=True, per_device_train_batch_size=16)
    tokenizer = load_tokenizer(str(tiny_base))
    dataset = build_sft_dataset(recipe, tokenizer)[0].select(range(16))
    plain, _ = _one_step(recipe, dataset, tokenizer)
    offloaded, _ = _one_step(dataclasses.replace(recipe, activation_offloading=True), dataset, tokenizer)
    assert max((plain[n] - offloaded[n]).abs().max().item() for n in plain) == 0.0


def test_varlen_kernel_matches_per_example_sdpa_forward_and_backward(tiny_base, alpaca_path):
    """PyTorch's CUDA varlen kernel behind our glue, bf16, GQA: packed per-example losses and the gradients they
    give the attention projections equal unpacked sdpa's within bf16 rounding."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.model.varlen_attention import register
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    recipe = Recipe(model_name_or_path=str(tiny_base), dataset_name=str(alpaca_path), max_length=96)
    dataset, _ = build_sft_dataset(recipe, load_tokenizer(str(tiny_base)))
    examples = [{"input_ids": dataset[i]["input_ids"], "labels": dataset[i]["labels"]} for i in range(4)]

    def losses_and_grads(attention: str, packed: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16, attn_implementation=attention)
        model = model.cuda()
        if packed:
            batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
            batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
            token_losses = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            losses = torch.stack([token_losses[a : b - 1].sum() for a, b in zip(starts, starts[1:])])
        else:
            losses = []
            for example in examples:
                ids, labels = torch.tensor([example["input_ids"]]).cuda(), torch.tensor([example["labels"]]).cuda()
                logits = model(input_ids=ids, use_cache=False).logits.float()
                losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum"))
            losses = torch.stack(losses)
        losses.sum().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if "self_attn" in n and p.grad is not None}
        return losses.detach(), grads

    reference, reference_grads = losses_and_grads("sdpa", packed=False)
    varlen, varlen_grads = losses_and_grads(register(), packed=True)
    torch.testing.assert_close(varlen, reference, rtol=2e-2, atol=2e-2)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, rtol=5e-2, atol=5e-3)
