"""What a run leaves in ``output_dir``: adapter, tokenizer with its chat template, recipe.yaml, results, model
card - staged, checked, moved into place, and pushed when the recipe asks."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hf_lora_recipe import inits, log
from hf_lora_recipe.data.pipeline import TRAINING_EXAMPLES
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, dump_recipe
from hf_lora_recipe.shipping.model_card import (
    LOSS_PLOT,
    RESULTS_FILE,
    card_tags,
    library_versions,
    plot_losses,
    write_card,
)


PICKLES = ("training_args.bin",)  # Trainer.save_model writes this pickle; we publish safetensors only
FINAL_FILES_LAST = "adapter_config.json"  # moved last: without it the directory is not loadable as an adapter
ADAPTER_FILE = "adapter_model.safetensors"
STAGING = ".staging-final"
WRITE_TEST_PREFIX = ".hf-lora-recipe-write-test-"  # train's check that output_dir is writable
CARD = "README.md"
CARD_TAG = "hf-lora-recipe"  # in the metadata tags of every card we write: how a README.md is known to be ours

# What train writes at the top of output_dir. The tokenizer names are every file a tokenizer's save_pretrained
# writes (which depend on its class); a folder holding anything else is not a run of ours.
RUN_FILES = {ADAPTER_FILE, FINAL_FILES_LAST, "recipe.yaml", RESULTS_FILE, LOSS_PLOT, CARD, TRAINING_EXAMPLES, *PICKLES}
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
}
# TensorBoard's logs, our staging, extra templates, and what any LoRA init keeps of step 0 (and its partial write)
RUN_FOLDERS = {"runs", STAGING, "additional_chat_templates", *inits.folders()}
IGNORED = {".DS_Store"}


def _trainer_card(path: Path) -> bool:
    """The draft card TRL's trainer wrote into output_dir at each checkpoint before we stopped it doing so."""
    try:
        return "It has been trained using [TRL]" in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def foreign_entries(output_dir: Path) -> list[str]:
    """What ``output_dir`` holds that train did not write (and so must never overwrite or mix with)."""
    from hf_lora_recipe.training.checkpoints import CHECKPOINT_FOLDER

    if not output_dir.is_dir():
        return []
    foreign = []
    entries = sorted(output_dir.iterdir(), key=lambda p: p.name)
    has_checkpoints = any(CHECKPOINT_FOLDER.match(p.name) for p in entries)
    for path in entries:
        name = path.name
        if name in IGNORED or name.startswith(WRITE_TEST_PREFIX):  # another rank's write test, gone in a moment
            continue
        if path.is_symlink():
            foreign.append(f"{name} (a symbolic link)")
        elif path.is_dir():
            if not (CHECKPOINT_FOLDER.match(name) or name in RUN_FOLDERS):
                foreign.append(f"{name}/")
        elif name == CARD:
            if CARD_TAG not in card_tags(path) and not (has_checkpoints and _trainer_card(path)):
                foreign.append(f"{CARD} (not a model card written by hf-lora-recipe)")
        elif name not in RUN_FILES | TOKENIZER_FILES:
            foreign.append(name)
    named_like_ours = [p.name for p in entries if p.name in TOKENIZER_FILES | RUN_FILES]
    if not foreign and named_like_ours and not _looks_like_our_run(output_dir):
        # the right names, but no sign that a run of ours wrote them (e.g. a tokenizer or adapter folder)
        foreign = named_like_ours
    return foreign


def _looks_like_our_run(output_dir: Path) -> bool:
    """A card, a record or a checkpoint of ours is there: the files named like ours are ours."""
    from hf_lora_recipe.training.checkpoints import CHECKPOINT_FOLDER, RUN_STATE

    if CARD_TAG in card_tags(output_dir / CARD):
        return True
    try:
        results = json.loads((output_dir / RESULTS_FILE).read_text())
        if isinstance(results, dict) and CARD_TAG in (results.get("libraries") or {}):
            return True
    except (OSError, ValueError):
        pass
    return any((p / RUN_STATE).is_file() for p in output_dir.iterdir() if CHECKPOINT_FOLDER.match(p.name))


def check_output_dir_is_ours(output_dir: Path) -> None:
    """Refuse, before training, an ``output_dir`` that holds files train did not write: it would overwrite them."""
    foreign = foreign_entries(output_dir)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise RecipeError(
            f"output_dir {output_dir} holds files hf-lora-recipe did not write: {shown}; training "
            "would overwrite or mix with them. Choose another output_dir (or move them out)"
        )


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
    trainer: Any,
    report: Any,
    mean_train_loss: float | None,
    seconds: float,
    dataset: dict[str, str],
    resumes: list[dict] | None = None,
) -> dict[str, Any]:
    """``training_results.json``: snake_case keys, numbers as numbers, null where there is nothing to report."""
    last_train_loss, eval_loss = final_losses(trainer.state.log_history)
    return {
        # the last logged loss; the run's mean when it ended before its first log line
        "final_train_loss": last_train_loss if last_train_loss is not None else mean_train_loss,
        "final_eval_loss": eval_loss,
        "optimizer_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        # a stream has no epoch: what it read while training instead
        "training_examples": (
            trainer.state.global_step
            * trainer.args.gradient_accumulation_steps
            * trainer.args.world_size
            * trainer.args.per_device_train_batch_size
        )
        if report.streamed is not None
        else len(trainer.train_dataset),
        "tokens_per_epoch": None if report.streamed is not None else report.total_tokens,
        "supervised_tokens_per_epoch": None if report.streamed is not None else report.supervised_tokens,
        **(
            {
                "stream": {
                    "rows_read_including_read_ahead": report.streamed.rows,
                    "examples_kept": report.streamed.kept,
                    "dropped": dict(report.streamed.dropped),
                    "tokens": report.streamed.tokens,
                }
            }
            if report.streamed is not None
            else {}
        ),
        **({"mixture": report.mixture} if report.mixture else {}),
        "wall_time_s": round(seconds, 1),
        "dataset": dataset,
        # resumes that changed the recipe or the data: where, what, and the data trained on before
        "resumes": resumes or [],
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
    trainer: Any,
    recipe: Recipe,
    tokenizer: Any,
    report: Any,
    derived: dict[str, Any],
    mean_train_loss: float | None,
    started: float,
    checkpoint: str | None = None,
    resumes: list[dict] | None = None,
) -> Path:
    """Write the final adapter and everything beside it into ``output_dir`` (:func:`push_run` publishes it);
    ``checkpoint``: the adapter is that checkpoint's (a run that reached its end without writing it)."""
    from hf_lora_recipe.data.mixture import dataset_versions
    from hf_lora_recipe.data.pipeline import save_example_hashes
    from hf_lora_recipe.templates.tokenizer import save_tokenizer
    from hf_lora_recipe.training.checkpoints import check_saved_adapter

    output_dir = Path(recipe.output_dir)
    staging = output_dir / STAGING
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)  # left by a run that died while publishing: never mix its files into this one
    trainer.accelerator.wait_for_everyone()
    if not inits.init_for(recipe).save_adapter(trainer, recipe, staging, checkpoint):  # e.g. saved converted
        save_trained_adapter(trainer, staging, checkpoint)
    if trainer.eval_dataset is not None:
        # the final eval loss, logged like the others; the evaluation after training reads its examples' losses
        trainer.final_evaluate(keep=recipe.final_eval_examples)
    if trainer.is_world_process_zero():
        check_saved_adapter(staging, recipe, trainer.state.global_step)
        remove_pickles(staging)
        save_tokenizer(tokenizer, staging)
        if report.streamed is None:  # eval tells rows training saw from its held-out ones by these
            save_example_hashes(trainer.train_dataset, staging)
        results = training_results(
            trainer, report, mean_train_loss, time.time() - started, dataset_versions(recipe), resumes
        )
        write_run_files(staging, recipe, derived, results, trainer.state.log_history)
        publish_directory(staging, output_dir)
        log.info(f"adapter written to {output_dir}")
    trainer.accelerator.wait_for_everyone()
    return output_dir


def save_trained_adapter(trainer: Any, staging: Path, checkpoint: str | None) -> None:
    """The adapter as trained (``checkpoint``: that checkpoint's), by the engine that trained it."""
    from hf_lora_recipe.distributed.engines import current_engine, save_sharded_adapter

    if checkpoint and (Path(checkpoint) / ADAPTER_FILE).is_file():
        if trainer.is_world_process_zero():  # written by the engine that trained it (DeepSpeed's model is not built)
            staging.mkdir(parents=True)
            for name in (ADAPTER_FILE, FINAL_FILES_LAST):
                shutil.copyfile(Path(checkpoint) / name, staging / name)
    elif current_engine().name == "fsdp" or checkpoint:
        save_sharded_adapter(trainer, str(staging))  # gathers the adapter only: every rank calls it
    else:
        trainer.save_model(str(staging))  # collective under DeepSpeed (ZeRO-3 gathers in 16 bit): every rank calls it


def push_run(recipe: Recipe, output_dir: Path) -> None:
    """Push the finished adapter (its card with the evaluation, if one ran) when the recipe asks; main process."""
    if recipe.push_to_hub and log.is_main_process():
        from hf_lora_recipe.shipping.hub_upload import push

        log.info(f"pushed to {push(output_dir, recipe.hub_model_id, private=recipe.hub_private_repo)}")
