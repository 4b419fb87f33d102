"""What a run leaves in ``output_dir``: adapter, tokenizer with its chat template, recipe.yaml, model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .card import LOSS_PLOT, RESULTS_FILE, plot_losses, write_card
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


def final_losses(log_history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    train = [entry["loss"] for entry in log_history if "loss" in entry]
    evaluation = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    return (train[-1] if train else None), (evaluation[-1] if evaluation else None)


def write_run_files(
    directory: Path, recipe: Recipe, derived: dict[str, Any], results: dict[str, Any], log_history: list[dict]
) -> None:
    """recipe.yaml, training_results.json, the loss plot and the model card."""
    dump_recipe(recipe, directory / "recipe.yaml", **derived)
    (directory / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(log_history, directory / LOSS_PLOT)
    write_card(directory, location=str(Path(recipe.output_dir).resolve()))
