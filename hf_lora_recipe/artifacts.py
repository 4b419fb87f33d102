"""What a run leaves in ``output_dir``: adapter, tokenizer with its chat template, recipe.yaml, model card."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, dump_recipe

PICKLES = ("training_args.bin",)  # Trainer.save_model writes this pickle; we publish safetensors only
FINAL_FILES_LAST = "adapter_config.json"  # moved last: without it the directory is not loadable as an adapter


def publish_directory(staging: Path, output_dir: Path) -> None:
    """Move finished files from ``staging`` into ``output_dir``, the adapter config last.

    A crash mid-way leaves no ``adapter_config.json`` next to a partial adapter, so
    ``PeftModel.from_pretrained`` refuses it instead of loading something half-written.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stale = output_dir / FINAL_FILES_LAST
    if stale.exists():
        stale.unlink()
    names = sorted(p.name for p in staging.iterdir())
    names.sort(key=lambda name: name == FINAL_FILES_LAST)
    for name in names:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()


def remove_pickles(directory: Path) -> None:
    for name in PICKLES:
        (directory / name).unlink(missing_ok=True)


def final_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


def model_card(recipe: Recipe, derived: dict[str, Any], results: dict[str, Any]) -> str:
    metadata = {
        "base_model": recipe.model_name_or_path,
        "library_name": "peft",
        "datasets": [recipe.dataset_name],
        "tags": ["qlora" if recipe.load_in_4bit else "lora", "sft", "trl", "hf-lora-recipe"],
    }
    rows = "\n".join(
        f"| `{key}` | `{value}` |"
        for key, value in [
            ("lora_r / lora_alpha / lora_dropout", f"{recipe.lora_r} / {recipe.lora_alpha} / {recipe.lora_dropout}"),
            ("lora_target_modules", ", ".join(recipe.lora_target_modules)),
            ("load_in_4bit", f"{recipe.load_in_4bit} ({recipe.bnb_4bit_quant_type}, double quant {recipe.use_bnb_nested_quant})"),
            ("learning_rate / scheduler", f"{recipe.learning_rate} / {recipe.lr_scheduler_type}"),
            ("global batch", f"{recipe.global_batch_size} = {recipe.per_device_train_batch_size} x "
             f"{derived['gradient_accumulation_steps']} x {derived['world_size']} processes"),
            ("epochs / max_steps", f"{recipe.num_train_epochs} / {recipe.max_steps}"),
            ("max_length", recipe.max_length),
            ("bf16 / gradient_checkpointing", f"{recipe.bf16} / {recipe.gradient_checkpointing}"),
        ]
    )
    results_rows = "\n".join(f"| {key} | {value} |" for key, value in results.items())
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# LoRA adapter for `{recipe.model_name_or_path}`

Fine-tuned with `hf-lora-recipe` on `{recipe.dataset_name}` ({recipe.dataset_format} format).
The full resolved recipe is in `recipe.yaml`.

## Hyperparameters

| setting | value |
|---|---|
{rows}

## Training results

| metric | value |
|---|---|
{results_rows}

## Prompt format and loss

Llama-2 format, rendered by the tokenizer's chat template: `<s>[INST] {{user}} [/INST] {{assistant}} </s>`.
Loss is computed on assistant tokens and their closing EOS only; prompts are masked.

## Load

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{recipe.model_name_or_path}")
model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_ADAPTER")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_ADAPTER")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "Hello"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**prompt, max_new_tokens=64)[0]))
```
"""


def write_run_files(directory: Path, recipe: Recipe, derived: dict[str, Any], results: dict[str, Any]) -> None:
    dump_recipe(recipe, directory / "recipe.yaml", **derived)
    (directory / "README.md").write_text(model_card(recipe, derived, results))
