"""Test artefacts built in-process, in about a second, instead of by a CLI training run.

``build_adapter_dir`` writes what ``hf-lora-recipe train`` leaves in ``output_dir`` - adapter, tokenizer with
its chat template, recipe.yaml, training_results.json, loss plot, model card - plus a ``checkpoint-2/`` that
must never be published. The LoRA weights are random (``init_lora_weights=False``: B is not zero), so an
adapter that is lost or mangled on the way changes the logits, as a trained one would. Training itself is
tested in test_train.py; tests that only need its output use this.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


FAKE_LOG_HISTORY = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
FAKE_DERIVED = {"gradient_accumulation_steps": 2, "world_size": 1}


def build_adapter_dir(
    base_dir: Path, out_dir: Path, *, load_in_4bit: bool = False, seed: int = 0, **recipe_overrides: Any
) -> Path:
    """A finished run's ``out_dir`` for the tiny base at ``base_dir`` (which also holds the tokenizer).

    ``load_in_4bit`` is recorded in the recipe (card, merge default) only: the base is loaded unquantized
    either way, since a LoRA adapter's tensors are the same for LoRA and QLoRA. ``recipe_overrides`` are
    further :class:`~hf_lora_recipe.recipe.schema.Recipe` fields. Returns ``out_dir``.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.data.mixture import dataset_versions
    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.architecture import with_projections
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.shipping.model_card import library_versions
    from hf_lora_recipe.shipping.output_dir import final_losses, write_run_files
    from hf_lora_recipe.templates.tokenizer import load_tokenizer, save_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(
        model_name_or_path=str(base_dir),
        load_in_4bit=load_in_4bit,
        output_dir=str(out_dir),
        bf16=False,
        max_steps=2,
        save_steps=1,
        logging_steps=1,
        seed=seed,
        **recipe_overrides,
    )

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = dataclasses.replace(lora_config(with_projections(recipe, base)), init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(load_tokenizer(str(base_dir)), out_dir)

    train_loss, eval_loss = final_losses(FAKE_LOG_HISTORY)
    results = {  # the keys of artifacts.training_results
        "final_train_loss": train_loss,
        "final_eval_loss": eval_loss,
        "optimizer_steps": FAKE_LOG_HISTORY[-1]["step"],
        "epochs": 0.01,
        "training_examples": 16,
        "tokens_per_epoch": 1024,
        "supervised_tokens_per_epoch": 512,
        "wall_time_s": 0.0,
        "dataset": dataset_versions(recipe),  # as a run records it: eval compares it with the data it re-splits
        "libraries": library_versions(),
    }
    write_run_files(out_dir, recipe, dict(FAKE_DERIVED), results, list(FAKE_LOG_HISTORY))

    checkpoint = out_dir / "checkpoint-2"  # what Trainer leaves behind; push must never publish it
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "optimizer.pt").write_bytes(b"optimizer state: never published")
    (checkpoint / "adapter_model.safetensors").write_bytes((out_dir / "adapter_model.safetensors").read_bytes())
    return out_dir


def probe_logits(model: Any, inputs: Any = None) -> Any:
    """The model's logits on ``inputs`` (default: a fixed random batch of 2 x 24 ids below 1000) in eval mode,
    as float32 on the CPU; the model's mode is restored."""
    import torch

    inputs = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0)) if inputs is None else inputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(inputs.to(model.device)).logits.float().cpu()
    finally:
        model.train(was_training)


def train_capturing_logits(monkeypatch: Any, argv: list[str]) -> tuple[int, Any]:
    """``train`` in this process; returns its exit code and the trained model's :func:`probe_logits`, taken right
    after its save (None when it did not get there)."""
    from hf_lora_recipe.commands.train import main as train_main
    from hf_lora_recipe.shipping import output_dir as artifacts

    captured = {}
    real_save_run = artifacts.save_run

    def save_run(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        written = real_save_run(trainer, *args, **kwargs)
        captured["logits"] = probe_logits(trainer.model)
        return written

    monkeypatch.setattr(artifacts, "save_run", save_run)
    return train_main(argv), captured.get("logits")
