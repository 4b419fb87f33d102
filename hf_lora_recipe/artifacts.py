"""What a run leaves in ``output_dir``: adapter, tokenizer with its chat template, recipe.yaml, results, model
card - staged, checked, moved into place, and pushed when the recipe asks."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import log
from .card import LOSS_PLOT, RESULTS_FILE, library_versions, plot_losses, write_card
from .config import Recipe, dump_recipe

PICKLES = ("training_args.bin",)  # Trainer.save_model writes this pickle; we publish safetensors only
FINAL_FILES_LAST = "adapter_config.json"  # moved last: without it the directory is not loadable as an adapter
STAGING = ".staging-final"


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


def training_results(
    trainer: Any, report: Any, mean_train_loss: float | None, seconds: float, dataset: dict[str, str],
) -> dict[str, Any]:
    """``training_results.json``: snake_case keys, numbers as numbers, null where there is nothing to report."""
    last_train_loss, eval_loss = final_losses(trainer.state.log_history)
    return {
        # the last logged loss; the run's mean when it ended before its first log line
        "final_train_loss": last_train_loss if last_train_loss is not None else mean_train_loss,
        "final_eval_loss": eval_loss,
        "optimizer_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "training_examples": len(trainer.train_dataset),
        "tokens_per_epoch": report.total_tokens,
        "supervised_tokens_per_epoch": report.supervised_tokens,
        "wall_time_s": round(seconds, 1),
        "dataset": dataset,
        "libraries": library_versions(),
    }


def write_run_files(
    directory: Path, recipe: Recipe, derived: dict[str, Any], results: dict[str, Any], log_history: list[dict]
) -> None:
    """recipe.yaml, training_results.json, the loss plot and the model card."""
    dump_recipe(recipe, directory / "recipe.yaml", **derived)
    (directory / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(log_history, directory / LOSS_PLOT)
    write_card(directory, location=str(Path(recipe.output_dir).resolve()))


def save_run(
    trainer: Any, recipe: Recipe, tokenizer: Any, report: Any, derived: dict[str, Any], mean_train_loss: float | None,
    started: float,
) -> Path:
    """Write the final adapter and everything beside it into ``output_dir``; push it when the recipe asks."""
    from .resilience import check_saved_adapter
    from .sources import dataset_version
    from .tokenizer import save_tokenizer

    output_dir = Path(recipe.output_dir)
    staging = output_dir / STAGING
    trainer.save_model(str(staging))  # collective under FSDP/DeepSpeed: every rank calls it
    if trainer.eval_dataset is not None:
        trainer.evaluate()  # the final eval loss, logged like the others
    if trainer.is_world_process_zero():
        check_saved_adapter(staging, recipe, trainer.state.global_step)
        remove_pickles(staging)
        save_tokenizer(tokenizer, staging)
        results = training_results(trainer, report, mean_train_loss, time.time() - started, dataset_version(recipe))
        write_run_files(staging, recipe, derived, results, trainer.state.log_history)
        publish_directory(staging, output_dir)
        log.info(f"adapter written to {output_dir}")
        if recipe.push_to_hub:
            from .publish import push

            log.info(f"pushed to {push(output_dir, recipe.hub_model_id, private=recipe.hub_private_repo)}")
    trainer.accelerator.wait_for_everyone()
    return output_dir
