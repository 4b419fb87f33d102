"""The faster paths are exactly correct: padding-free packing keeps examples apart, the plain loss equals TRL's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_lora_recipe.data.pipeline import build_sft_dataset
from hf_lora_recipe.recipe.schema import Recipe
from hf_lora_recipe.templates.tokenizer import load_tokenizer


def _token_losses(model, input_ids, labels, **kwargs) -> torch.Tensor:
    # use_cache=False as in training: transformers derives the packed-sequence mask only without a KV cache
    # (with one, this test sees the examples leak into each other, as the negative control below shows).
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")


def test_padding_free_per_example_losses_equal_unpacked(tiny_base, alpaca_path):
    recipe = Recipe(model_name_or_path=str(tiny_base), dataset_name=str(alpaca_path), max_length=96)
    dataset, _ = build_sft_dataset(recipe, load_tokenizer(str(tiny_base)))
    examples = [{"input_ids": dataset[i]["input_ids"], "labels": dataset[i]["labels"]} for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation="sdpa").eval()

    unpacked = [
        _token_losses(model, torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])).sum() for e in examples
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    packed_tokens = _token_losses(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    packed = [packed_tokens[start : end - 1].sum() for start, end in zip(starts, starts[1:])]
    for one, together in zip(unpacked, packed):
        torch.testing.assert_close(together, one, rtol=1e-5, atol=1e-4)

    # and the check can fail: without position ids the same row is one long causal sequence
    leaked_tokens = _token_losses(model, batch["input_ids"], batch["labels"])
    leaked = [leaked_tokens[start : end - 1].sum() for start, end in zip(starts, starts[1:])]
    assert not torch.allclose(torch.stack(leaked[1:]), torch.stack(unpacked[1:]), rtol=1e-3)


def test_plain_loss_equals_trls_fused_loss(tiny_base, alpaca_path, tmp_path):
    from trl import SFTConfig

    from hf_lora_recipe.training.trainer import RecipeTrainer

    recipe = Recipe(model_name_or_path=str(tiny_base), dataset_name=str(alpaca_path), max_length=96)
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    losses = []
    for fused in (True, False):
        trainer = RecipeTrainer(
            model=model,
            fused_loss=fused,
            train_dataset=dataset,
            processing_class=tokenizer,
            args=SFTConfig(
                output_dir=str(tmp_path),
                use_cpu=True,
                report_to="none",
                per_device_train_batch_size=4,
                dataset_kwargs={"skip_prepare_dataset": True},
            ),
        )
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            losses.append(
                trainer.compute_loss(model, batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum())
            )
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


INTEL_SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AMD_EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
ARM_NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_the_cpu_flags_say_whether_bf16_runs_in_hardware():
    from hf_lora_recipe.training.trainer import cpu_has_native_bf16

    assert cpu_has_native_bf16(INTEL_SAPPHIRE_RAPIDS) is True
    assert cpu_has_native_bf16(AMD_EPYC_AVX2) is False
    assert cpu_has_native_bf16(ARM_NEOVERSE_V1) is True
    assert cpu_has_native_bf16("processor\t: 0\n") is None  # no flags line: say nothing rather than guess


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU bf16 is the GPU's")
def test_the_start_line_says_when_bf16_is_emulated_on_this_cpu(monkeypatch):
    from hf_lora_recipe.training import trainer

    fp32 = Recipe(dataset_name="rows.json", bf16=False, bnb_4bit_compute_dtype="float32")
    qlora_bf16_compute = Recipe(dataset_name="rows.json", bf16=False, bnb_4bit_compute_dtype="bfloat16")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)
    assert trainer.bf16_state(fp32) == "off"
    assert trainer.bf16_state(qlora_bf16_compute).startswith("on, emulated: this CPU has no AVX512-BF16 or AMX")
    assert trainer.bf16_state(Recipe(dataset_name="rows.json")).startswith("on, emulated")
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.bf16_state(Recipe(dataset_name="rows.json")) == "on"


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_qlora_adapter_computes_in_the_dtype_the_start_line_says(tiny_base, alpaca_path, tmp_path, compute_dtype):
    """fp32 compute keeps fp32 adapters through the trainer (TRL casts a quantized model's adapter to bf16, which
    a CPU without bf16 hardware emulates in every LoRA matmul); bf16 compute keeps bf16 adapters, as TRL trains
    QLoRA. The plain SFTTrainer beside it shows the cast this undoes."""
    from trl import SFTConfig, SFTTrainer

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.training.trainer import RecipeTrainer, bf16_state

    recipe = Recipe(
        model_name_or_path=str(tiny_base),
        dataset_name=str(alpaca_path),
        max_length=96,
        bf16=False,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    expected = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype]
    assert bf16_state(recipe).startswith("off" if compute_dtype == "float32" else "on")

    def adapter_dtypes(trainer_class, **kwargs):
        trainer = trainer_class(
            model=add_adapter(load_base_model(recipe), recipe),
            train_dataset=dataset,
            processing_class=tokenizer,
            args=SFTConfig(
                output_dir=str(tmp_path), use_cpu=True, report_to="none", dataset_kwargs={"skip_prepare_dataset": True}
            ),
            **kwargs,
        )
        return {p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}

    assert adapter_dtypes(RecipeTrainer, fused_loss=False) == {expected}
    assert adapter_dtypes(SFTTrainer) == {torch.bfloat16}
