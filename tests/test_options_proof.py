"""Opt-in speed and memory options prove they took effect, stop the run in one line, or say "off (why)".

The tiny random Llama of conftest, the recipe's own ``build_trainer``; each check is also shown failing.
"""

from __future__ import annotations

import pytest
import torch

from hf_lora_recipe.recipe.schema import Recipe, RecipeError


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe_for(base, tmp_path, **overrides) -> Recipe:
    settings = dict(
        model_name_or_path=str(base),
        load_in_4bit=False,
        bf16=False,
        lora_target_modules=SEVEN,
        max_steps=1,
        per_device_train_batch_size=2,
        global_batch_size=4,
        logging_steps=1,
        save_steps=100,
        report_to=["none"],
        output_dir=str(tmp_path / "run"),
        padding_free="false",
    )
    return Recipe(**{**settings, **overrides})


def trainer_for(recipe: Recipe, base, accumulation: int = 2, auto_micro_batch: bool = False, rows: int = 8):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.templates.tokenizer import load_tokenizer
    from hf_lora_recipe.training.trainer import build_trainer

    model = add_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), recipe)
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 1000, (12,), generator=generator).tolist() for _ in range(rows)]
    dataset = Dataset.from_dict({"input_ids": ids, "labels": [[-100] * 6 + row[6:] for row in ids]})
    return build_trainer(
        recipe, model, load_tokenizer(str(base)), dataset, None, accumulation, [], auto_micro_batch=auto_micro_batch
    )


def proof(trainer):
    from hf_lora_recipe.training.trainer import OptionsTookEffect

    return next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, OptionsTookEffect))


def test_the_start_line_says_why_an_asked_option_is_off(tiny_base, tmp_path):
    from hf_lora_recipe.training.trainer import speed_line

    line = speed_line(recipe_for(tiny_base, tmp_path, use_liger_kernel=True, activation_offloading=True))
    assert (
        "liger-kernel: off (" in line
        and "activation offloading: off (no GPU: activations already live in RAM)" in line
    )
    assert "; compile: off;" in speed_line(recipe_for(tiny_base, tmp_path))
    assert "; compile: on (proved after step 1);" in speed_line(recipe_for(tiny_base, tmp_path, compile=True))


def test_an_attention_the_model_does_not_run_stops_the_run(tiny_base, tmp_path, monkeypatch):
    import hf_lora_recipe.training.trainer as recipe_trainer

    recipe = recipe_for(tiny_base, tmp_path)
    trainer_for(recipe, tiny_base)  # sdpa chosen, sdpa running: no error
    monkeypatch.setattr(recipe_trainer, "attention_for", lambda recipe: "varlen")
    with pytest.raises(RecipeError, match=r"^attn_implementation: varlen was chosen but the model runs sdpa; "):
        trainer_for(recipe, tiny_base)


def test_auto_micro_batch_is_what_step_one_trained(tiny_base, tmp_path, capsys):
    trainer = trainer_for(recipe_for(tiny_base, tmp_path), tiny_base, auto_micro_batch=True)
    trainer.train()
    assert "micro-batch auto: step 1 trained 2 x 2 examples per process, as chosen" in capsys.readouterr().out

    # the trainer yields micro-batches of 1 where auto chose 2
    trainer = trainer_for(
        recipe_for(tiny_base, tmp_path / "other", per_device_train_batch_size=1), tiny_base, auto_micro_batch=True
    )
    proof(trainer).recipe = recipe_for(tiny_base, tmp_path / "other")
    with pytest.raises(
        RecipeError,
        match=r"^per_device_train_batch_size auto chose 2, but step 1 trained 2 "
        r"examples on this process, not 2 x 2; ",
    ):
        trainer.train()


def test_liger_that_patched_nothing_stops_the_run(tiny_base, tmp_path, monkeypatch):
    """As on a CUDA machine whose Liger applied nothing to this architecture: after step 1 no module runs a Liger
    forward, and the run stops rather than train without it."""
    import hf_lora_recipe.training.trainer as recipe_trainer

    monkeypatch.setattr(recipe_trainer, "liger_active", lambda requested: requested)
    trainer = trainer_for(recipe_for(tiny_base, tmp_path, use_liger_kernel=True), tiny_base)
    trainer.args.use_liger_kernel = False  # Trainer.train then applies nothing
    with pytest.raises(RecipeError, match=r"^use_liger_kernel: true was asked, but no module runs a Liger forward"):
        trainer.train()


def test_compile_true_is_checked_after_step_one(tiny_base, tmp_path):
    """The callback calls the compile check: a model whose layers were never compiled stops the run."""
    trainer = trainer_for(recipe_for(tiny_base, tmp_path), tiny_base)  # compiled: no
    proof(trainer).recipe = recipe_for(tiny_base, tmp_path, compile=True)
    with pytest.raises(RecipeError, match=r"^compile: true was asked, but after step 1 decoder layers \[0, 1\] never"):
        trainer.train()


@pytest.mark.slow
def test_compile_true_trains_with_every_layer_compiled(tiny_base, tmp_path, capsys):
    trainer = trainer_for(recipe_for(tiny_base, tmp_path, compile=True), tiny_base)
    trainer.train()
    assert "compile: all 2 decoder layers ran compiled in step 1" in capsys.readouterr().out
