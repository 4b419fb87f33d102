"""The train pipeline, as `hf-lora-recipe train` and `accelerate launch -m hf_lora_recipe.train` run it.

Launch check -> checks before loading (output_dir, names, base and LoRA targets on the meta device, where to
start) -> tokenizer (and its template tokens' rows in the base) & data -> base & adapter -> TRL SFTTrainer ->
train -> artifacts -> base vs adapter on held-out data -> push.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hf_lora_recipe import inits, log
from hf_lora_recipe.distributed.engines import Engine, check_engine, current_engine
from hf_lora_recipe.model.loading import check_attention_name
from hf_lora_recipe.planning.estimates import BaseOnMeta, check_rank_fits
from hf_lora_recipe.recipe.schema import AUTO, Recipe, RecipeError, gradient_accumulation_steps
from hf_lora_recipe.training.auto_micro_batch import resolve as resolve_micro_batch


if TYPE_CHECKING:
    from hf_lora_recipe.planning.estimates import Memory
    from hf_lora_recipe.training.checkpoints import Start


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal) or for safety (NaN): the message says where to resume from."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Launch:
    """What the launcher decided and the recipe derived from it."""

    world_size: int
    accumulation: int
    engine: Engine
    base: BaseOnMeta  # targets and shape, from the one meta-device build of this run

    def derived(self) -> dict[str, int | str]:
        return {
            "gradient_accumulation_steps": self.accumulation,
            "world_size": self.world_size,
            "engine": str(self.engine),
        }


def check_launch(recipe: Recipe, launcher: bool = False) -> tuple[Recipe, Launch]:
    """The micro-batch (auto resolved against memory) and accumulation for this launch's world size; an
    indivisible global batch fails before anything loads. ``launcher``: checked by the process that starts the
    others (pipeline/launch.py), which has the launch's variables but no process group."""
    world_size = log.world_size()
    engine = current_engine()
    check_engine(recipe, engine)
    inits.check_recipe(recipe)  # run() is called with recipes the parser did not build, too
    inits.check_engine(recipe, engine.name)
    check_attention_name(recipe)
    check_output_dir(recipe)  # before the base's config.json is read: what the user can fix without waiting
    base = BaseOnMeta(recipe)
    recipe = base.resolved_recipe()
    auto = recipe.per_device_train_batch_size == AUTO
    recipe, micro_batch = resolve_micro_batch(
        recipe, world_size, shape=base.shape if auto else None, across_ranks=not launcher
    )
    if micro_batch:
        log.info(micro_batch.line())
    launch = Launch(world_size, gradient_accumulation_steps(recipe, world_size), engine, base)
    log.info(
        f"{engine}: world size {world_size} x micro-batch {recipe.per_device_train_batch_size} x gradient accumulation "
        f"{launch.accumulation} = global batch {recipe.global_batch_size}"
    )
    return recipe, launch


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(recipe: Recipe) -> None:
    """``output_dir`` is (or can be created as) a writable folder holding nothing train did not write.

    Nothing is created here: a write test in the folder (or its nearest existing parent) is removed again, so a
    run that fails later leaves no empty folder behind.
    """
    from hf_lora_recipe.shipping.output_dir import WRITE_TEST_PREFIX, check_output_dir_is_ours

    output_dir = Path(recipe.output_dir)
    existing = _nearest_existing(output_dir)
    if existing == output_dir and not output_dir.is_dir():
        what = "a broken symbolic link" if output_dir.is_symlink() else "a file"
        raise RecipeError(f"output_dir {output_dir} is {what}, not a folder: choose another output_dir")
    if existing != output_dir and not existing.is_dir():
        raise RecipeError(
            f"output_dir {output_dir} cannot be created: {existing} is a file; choose another output_dir"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=WRITE_TEST_PREFIX):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        if existing == output_dir:
            raise RecipeError(
                f"output_dir {output_dir} is not writable ({reason}): choose another output_dir or make it writable"
            ) from None
        raise RecipeError(
            f"output_dir {output_dir} cannot be created: {existing} is not writable ({reason}); "
            "choose another output_dir"
        ) from None
    check_output_dir_is_ours(output_dir)


def check_before_loading(recipe: Recipe, launch: Launch) -> Start:
    """Everything the recipe, the file system and the base's config.json can tell, before any weight, token or
    row is read: trainer names, the base, the LoRA targets on the meta device, where to start (output_dir is
    checked in :func:`check_launch`)."""
    from hf_lora_recipe.data.mixture import check_sources
    from hf_lora_recipe.distributed.engines import check_resume_engine
    from hf_lora_recipe.training.checkpoints import choose_start, resume_note
    from hf_lora_recipe.training.run_identity import run_identity
    from hf_lora_recipe.training.trainer import check_names
    from hf_lora_recipe.upstream.notices import quiet_libraries

    quiet_libraries()
    check_names(recipe)
    check_sources(recipe)  # each local dataset's path and splits exist (reads no rows)
    if recipe.push_to_hub:  # a push that can only fail must fail now, not after the training it would publish
        from hf_lora_recipe.shipping.hub_upload import check_push_possible

        check_push_possible(recipe.hub_model_id)
    targets = launch.base.targets
    check_rank_fits(recipe, launch.base.shape)
    modules = sum(len(names) for names in targets.values())
    log.info(f"LoRA on {modules} modules ({', '.join(targets)})")
    start = choose_start(recipe, run_identity(recipe))
    if start.checkpoint and not start.finished:
        check_resume_engine(Path(start.checkpoint), launch.engine)
        log.info(resume_note(start.checkpoint, launch.accumulation, launch.world_size))
    return start


def planned_step(recipe: Recipe, launch: Launch) -> tuple[float | None, Memory]:
    """Plan's figures for this launch: FLOPs per token on a GPU (for the MFU in the log; None on a CPU) and the
    memory per process by component (against what each rank holds after step 1, and the measured GPU peak)."""
    import torch

    from hf_lora_recipe.planning.estimates import flops_per_token, memory

    shape = launch.base.shape
    planned = memory(shape, recipe, recipe.per_device_train_batch_size, launch.world_size, launch.engine.plan_strategy)
    return (flops_per_token(shape, recipe)["total"] if torch.cuda.is_available() else None), planned


def run(recipe: Recipe) -> Path:
    """Train and write the adapter; returns ``output_dir``."""
    started = time.time()
    recipe, launch = check_launch(recipe)
    start = check_before_loading(recipe, launch)
    if start.finished:
        log.info(f"run complete: {start.finished}")
        return Path(recipe.output_dir)

    import torch
    from accelerate import PartialState
    from transformers import set_seed

    from hf_lora_recipe.data.pipeline import train_and_eval
    from hf_lora_recipe.data.streaming import stream_and_eval
    from hf_lora_recipe.distributed.engines import let_fsdp_run_on_cpu
    from hf_lora_recipe.distributed.rank_memory import HoldingsReport
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import count_parameters, load_base_model, trainable_line
    from hf_lora_recipe.planning.estimates import GIB
    from hf_lora_recipe.shipping.output_dir import push_run, save_run
    from hf_lora_recipe.templates.tokenizer import tokenizer_for
    from hf_lora_recipe.templates.untrained_tokens import check_template_tokens
    from hf_lora_recipe.training.checkpoints import (
        NonFiniteError,
        NonFiniteGuard,
        RunStateCallback,
        StopOnSignal,
        clear_for_fresh_start,
        latest_complete_checkpoint,
        load_checkpoint_state,
    )
    from hf_lora_recipe.training.trainer import build_trainer, speed_line

    # --- Tokenizer and data: cheap, so they fail before the model loads. The main process fills the
    # datasets cache; the other ranks then read it instead of racing to write it.
    tokenizer = tokenizer_for(recipe)
    template_tokens = check_template_tokens(recipe, tokenizer)  # untrained chat-token rows stop the run here
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        train_dataset, eval_dataset, report = (stream_and_eval if recipe.streaming else train_and_eval)(
            recipe, tokenizer
        )
    for line in report.summary().splitlines():  # a mixture: a line per source, then the mixture's
        log.info(line)
    log.info(
        f"tokens per optimizer step ~ {report.mean_length * recipe.global_batch_size:,.0f} "
        f"({report.mean_length:.0f} mean x {recipe.global_batch_size})"
    )

    # --- Base and adapter (seeded first: LoRA's A matrices are drawn at random)
    set_seed(recipe.seed)
    init = inits.init_for(recipe)
    model = add_adapter(load_base_model(recipe), recipe, template_tokens, data=train_dataset)
    if not init.final_after_trainer:  # else its proof runs once after_trainer has finished the adapter
        check_variants(model, recipe)  # rsLoRA / DoRA / the init's own step-0 proof: what PEFT built
        log.info(trainable_line(*count_parameters(model)))
    init.keep(model, recipe, resumed=start.checkpoint is not None)

    # --- Trainer, resuming from the checkpoint chosen above (a fresh start clears old checkpoints only now)
    if start.checkpoint is None:
        clear_for_fresh_start(recipe)
    stopper = StopOnSignal()
    log.info(speed_line(recipe))
    flops, planned = planned_step(recipe, launch)
    if let_fsdp_run_on_cpu():
        log.info("FSDP on CPU processes: sharding over gloo (accelerate alone would fall back to DDP here)")
    callbacks = [
        NonFiniteGuard(),
        stopper,
        RunStateCallback(launch.accumulation, launch.world_size, start.identity, start.resumes),
        HoldingsReport(planned, launch.engine, launch.world_size),
    ]
    trainer = build_trainer(
        recipe, model, tokenizer, train_dataset, eval_dataset, launch.accumulation, callbacks, flops
    )
    init.after_trainer(trainer, recipe, start.checkpoint)

    # --- Train (Trainer would take one step past max_steps when resumed at it: a run that trained to the end
    # but never wrote its adapter only writes it)
    if start.publish_only:
        log.info(
            f"{start.checkpoint} reached the last step ({start.step}) but the final adapter was never written: "
            "writing it from that checkpoint, without training"
        )
        load_checkpoint_state(trainer, start.checkpoint)
        output_dir = save_run(
            trainer, recipe, tokenizer, report, launch.derived(), None, started, start.checkpoint, start.resumes
        )
        push_run(recipe, output_dir)
        return output_dir
    if start.checkpoint and not trainer.restore_counts(start.checkpoint):
        log.info(f"{start.checkpoint} holds no data counts for this world size: the data digest covers this run only")
    if start.checkpoint and recipe.streaming:
        log.info(
            "streaming: the trainer re-reads the stream from its start and skips the examples the checkpoint "
            "trained (the stream's order is fixed by the seed, so training continues at the next example as "
            "long as the data is unchanged; the data digest at the end covers the whole run)"
        )
    try:
        outcome = trainer.train(resume_from_checkpoint=start.checkpoint)
    except NonFiniteError as error:
        raise TrainingStopped(str(error), exit_code=3) from None
    log.every_rank(trainer.data_line())
    if torch.cuda.is_available():
        log.info(
            f"peak GPU memory {torch.cuda.max_memory_allocated() / GIB:.2f} GiB allocated; planned "
            f"{planned.total / GIB:.2f} GiB (including a 1 GiB allowance for the CUDA context)"
        )
    if stopper.signal:
        raise TrainingStopped(
            f"stopped by signal {stopper.signal} at step {trainer.state.global_step}; checkpoint saved at "
            f"{latest_complete_checkpoint(recipe.output_dir)}; run the same command again to resume",
            exit_code=128 + stopper.signal,
        )

    # --- Artifacts: staged, checked, then published (and pushed) by the main process only
    output_dir = save_run(
        trainer, recipe, tokenizer, report, launch.derived(), outcome.training_loss, started, resumes=start.resumes
    )

    # --- Base vs adapter on final_eval_examples held-out examples, into the card (main process only)
    from hf_lora_recipe.evaluation.scoring import evaluate_after_training

    # what users load is scored: the trained model, or (an init saved otherwise than trained) the saved adapter
    evaluate_after_training(
        recipe,
        output_dir,
        eval_dataset,
        trainer.model if init.scores_trained_model else None,
        tokenizer,
        trainer.example_losses,
    )
    push_run(recipe, output_dir)
    return output_dir
