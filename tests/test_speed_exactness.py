"""The speed options change how the work is split and counted, never the numbers (issue 13).

Each fast path against its reference on a tiny fp32 model at LoRA dropout 0: the global batch split as 4 x 4
or 16 x 1 gives the same update; the device-side counters give the same digest however the tokens were
batched; auto micro-batch picks the largest divisor the plan says fits; the throughput line's MFU is the
plan's FLOPs over the peak.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_lora_recipe.data.pipeline import build_sft_dataset
from hf_lora_recipe.inits.adapter import add_adapter
from hf_lora_recipe.model.loading import attention_for
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, load_recipe
from hf_lora_recipe.templates.tokenizer import load_tokenizer
from hf_lora_recipe.training.trainer import build_trainer


def _recipe(tiny_base, alpaca_path, tmp_path, **changes) -> Recipe:
    settings = dict(
        model_name_or_path=str(tiny_base),
        dataset_name=str(alpaca_path),
        max_length=64,
        lora_dropout=0.0,
        load_in_4bit=False,
        bf16=False,
        gradient_checkpointing=False,
        max_grad_norm=1e9,
        max_steps=1,
        global_batch_size=16,
        optim="sgd",
        learning_rate=1.0,
        output_dir=str(tmp_path),
        logging_steps=1,
        report_to=["none"],
    )
    return Recipe(**{**settings, **changes})


def _adapted(recipe: Recipe):
    """The fp32 tiny base with the recipe's adapter, attending as a run with this recipe would here."""
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model_name_or_path, dtype=torch.float32, attn_implementation=attention_for(recipe)
    )
    return add_adapter(model, recipe)


def _one_step(recipe: Recipe, dataset, tokenizer, per_token_mean: bool = False, callbacks=()) -> tuple[dict, object]:
    """The adapter's weights after one optimizer step (plain SGD at lr 1: the update is the gradient itself)."""
    torch.manual_seed(0)
    model = _adapted(recipe)
    accumulation = recipe.global_batch_size // recipe.per_device_train_batch_size
    trainer = build_trainer(recipe, model, tokenizer, dataset, None, accumulation, list(callbacks))
    if per_token_mean:  # the classic accumulation bug: each micro-batch's own mean, averaged
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("padding_free,lm_head_loss", [("true", "plain"), ("false", "plain"), ("true", "fused")])
def test_micro_batch_4_x_accumulation_4_equals_16_x_1(tiny_base, alpaca_path, tmp_path, padding_free, lm_head_loss):
    recipe = _recipe(tiny_base, alpaca_path, tmp_path, padding_free=padding_free, lm_head_loss=lm_head_loss)
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    dataset = dataset.select(range(16))
    initial = {name: p.detach().clone() for name, p in _adapted(recipe).named_parameters() if p.requires_grad}

    whole, _ = _one_step(dataclasses.replace(recipe, per_device_train_batch_size=16), dataset, tokenizer)
    split, _ = _one_step(dataclasses.replace(recipe, per_device_train_batch_size=4), dataset, tokenizer)
    moved = max((whole[n] - initial[n]).abs().max().item() for n in whole)
    assert moved > 1e-3  # the step did something the comparison can see
    difference = max((whole[n] - split[n]).abs().max().item() for n in whole)
    assert difference <= 1e-6, difference

    if padding_free == "true" and lm_head_loss == "plain":  # and the comparison catches a mean of means
        wrong, _ = _one_step(
            dataclasses.replace(recipe, per_device_train_batch_size=4), dataset, tokenizer, per_token_mean=True
        )
        assert max((whole[n] - wrong[n]).abs().max().item() for n in whole) > 1e-4


def test_counts_and_digest_do_not_depend_on_batching(tiny_base, alpaca_path, tmp_path):
    recipe = _recipe(tiny_base, alpaca_path, tmp_path, train_sampling_strategy="sequential")
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    dataset = dataset.select(range(16))
    lines = {}
    for padding_free, micro_batch in (("true", 16), ("false", 4), ("false", 16)):
        changed = dataclasses.replace(recipe, padding_free=padding_free, per_device_train_batch_size=micro_batch)
        _, trainer = _one_step(changed, dataset, tokenizer)
        counts = trainer.counts()
        lines[(padding_free, micro_batch)] = (
            counts["examples"],
            counts["supervised"],
            counts["tokens"],
            counts["digest"],
        )
    assert len(set(lines.values())) == 1, lines
    assert lines[("true", 16)][0] == 16

    _, reordered = _one_step(recipe, dataset.select(list(range(1, 16)) + [0]), tokenizer)
    assert reordered.counts()["digest"] != lines[("true", 16)][3]  # the same tokens in another order


def test_throughput_line_reports_tokens_per_second_and_mfu(tiny_base, alpaca_path, tmp_path, capsys):
    recipe = _recipe(
        tiny_base,
        alpaca_path,
        tmp_path,
        lm_head_loss="fused",
        max_steps=3,
        global_batch_size=4,
        per_device_train_batch_size=4,
    )
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)

    class Logs(TrainerCallback):
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    torch.manual_seed(0)
    model = _adapted(recipe)
    trainer = build_trainer(recipe, model, tokenizer, dataset, None, 1, [Logs()], flops_per_token=2e9)
    trainer.peak_flops = 1e12  # as on a GPU plan knows (trainer.peak_flops); this CPU has none
    trainer.train()
    steps = [log for log in Logs.seen if "loss" in log]
    assert len(steps) == 3 and "tokens_per_second" not in steps[0]  # the first interval includes start-up
    for log in steps[1:]:
        assert log["tokens_per_second"] > 0
        assert log["mfu"] == pytest.approx(log["tokens_per_second"] * 2e9 / 1e12, rel=1e-3)
        # TRL's metrics, summed on the device and read at log time: a random model is near-uniform over 32,000
        assert 0 <= log["mean_token_accuracy"] < 0.01 and 9.5 < log["entropy"] <= torch.log(torch.tensor(32000.0))
    assert "step 3: " in capsys.readouterr().out


# ---------------------------------------------------------------- per_device_train_batch_size: auto


def _shape(tiny_base, recipe):
    from hf_lora_recipe.model.loading import model_config
    from hf_lora_recipe.planning.estimates import measure_shape

    return measure_shape(model_config(recipe), recipe)


def test_auto_micro_batch_is_the_largest_divisor_within_the_budget(tiny_base):
    from hf_lora_recipe.planning.estimates import memory
    from hf_lora_recipe.training.auto_micro_batch import resolve

    recipe = load_recipe(
        overrides={
            "model_name_or_path": str(tiny_base),
            "per_device_train_batch_size": "auto",
            "global_batch_size": 24,
            "padding_free": "false",
        }
    )
    shape = _shape(tiny_base, recipe)
    planned = {size: memory(shape, recipe, size).total for size in (1, 2, 3, 4, 6, 8, 12, 24)}
    budget_gb = (planned[6] + planned[8]) / 2 / 1024**3  # 6 fits, 8 does not
    resolved, chosen = resolve(dataclasses.replace(recipe, memory_budget_gb=budget_gb), world_size=1, shape=shape)
    assert resolved.per_device_train_batch_size == chosen.size == 6
    assert chosen.planned_bytes == planned[6] and "micro-batch auto -> 6" in chosen.line()

    with pytest.raises(RecipeError, match="even a micro-batch of 1 is planned at .* memory_budget_gb"):
        resolve(dataclasses.replace(recipe, memory_budget_gb=planned[1] / 2 / 1024**3), world_size=1, shape=shape)


def test_auto_stops_packed_rows_at_four_examples_under_a_dense_mask(tiny_base):
    from hf_lora_recipe.training.auto_micro_batch import resolve

    recipe = load_recipe(
        overrides={
            "model_name_or_path": str(tiny_base),
            "per_device_train_batch_size": "auto",
            "global_batch_size": 32,
            "padding_free": "true",
            "memory_budget_gb": 100,
            "attn_implementation": "sdpa",
        }
    )
    assert resolve(recipe, world_size=1)[0].per_device_train_batch_size == 4  # sdpa over packed rows
    per_example = dataclasses.replace(recipe, attn_implementation="auto")  # varlen on a CPU-only machine
    assert resolve(per_example, world_size=1)[0].per_device_train_batch_size == 32
    padded = dataclasses.replace(recipe, padding_free="false")
    assert resolve(padded, world_size=1)[0].per_device_train_batch_size == 32  # everything fits in 100 GB


def test_one_meta_build_per_run_serves_targets_micro_batch_and_plan(tiny_base, alpaca_path, tmp_path, monkeypatch):
    """The launch resolves auto, checks the targets and plans the step from one base built on the meta device."""
    from hf_lora_recipe.pipeline.train_run import check_before_loading, check_launch, planned_step

    built = []
    real = AutoModelForCausalLM.from_config  # every model built from a config, whoever builds it
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_config", lambda *args, **kwargs: built.append(args) or real(*args, **kwargs)
    )
    recipe = dataclasses.replace(
        _recipe(tiny_base, alpaca_path, tmp_path), per_device_train_batch_size="auto", memory_budget_gb=100
    )
    recipe, launch = check_launch(recipe)
    check_before_loading(recipe, launch)
    planned_step(recipe, launch)
    assert isinstance(recipe.per_device_train_batch_size, int)
    assert sum(len(names) for names in launch.base.targets.values()) == 14 and launch.base.shape.trainable > 0
    assert len(built) == 1


def test_plan_resolves_auto_for_the_gpu_it_plans_for(tiny_base):
    from hf_lora_recipe.planning.plan import make_plan, render

    recipe = load_recipe(overrides={"model_name_or_path": str(tiny_base), "per_device_train_batch_size": "auto"})
    plan = make_plan(recipe, gpu="H200")
    assert plan["micro_batch_auto"]["chosen"] == 128  # a tiny model: the whole global batch fits in 141 GiB
    assert "micro-batch    auto -> 128 (largest divisor of the per-GPU batch within 141.00 GiB)" in render(plan)
    small = make_plan(dataclasses.replace(recipe, memory_budget_gb=1.05), gpu="H200")["micro_batch_auto"]["chosen"]
    assert small is not None and small < 128


def test_auto_or_a_number_and_nothing_else():
    assert load_recipe(overrides={"per_device_train_batch_size": "AUTO"}).per_device_train_batch_size == "auto"
    with pytest.raises(RecipeError, match="per_device_train_batch_size: cannot read 'many' as int or auto"):
        load_recipe(overrides={"per_device_train_batch_size": "many"})
    with pytest.raises(RecipeError, match="memory_budget_gb must be positive"):
        load_recipe(overrides={"memory_budget_gb": 0})
