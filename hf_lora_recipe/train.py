"""Train a LoRA / QLoRA adapter from a recipe.

    hf-lora-recipe train --config R.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_lora_recipe.train --config R.yaml [...]

Both run :func:`run`: recipe -> tokenizer & data -> base & adapter -> TRL SFTTrainer -> artifacts.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError, gradient_accumulation_steps, load_recipe, parse_cli_overrides


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal) or for safety (NaN): the message says where to resume from."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main_process():
        print(f"[hf-lora-recipe] {message}", flush=True)


def log_every_rank(message: str) -> None:
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"[hf-lora-recipe rank {rank}/{world}] {message}", flush=True)


def padding_free(recipe: Recipe) -> bool:
    """``auto``: on the CPU always; on a GPU only with flash-attention, whose varlen kernel keeps its speed."""
    if recipe.padding_free != "auto":
        return recipe.padding_free == "true"
    import torch

    from .modeling import available_attention

    return not torch.cuda.is_available() or available_attention(recipe.attn_implementation).startswith("flash_attention")


def trainer_config(recipe: Recipe, accumulation: int, has_eval: bool = False) -> Any:
    import torch
    from trl import SFTConfig

    from .modeling import fsdp_checkpoints_activations, liger_active

    return SFTConfig(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps,
        num_train_epochs=recipe.num_train_epochs,
        max_steps=recipe.max_steps,
        optim=recipe.optim,
        adam_beta1=recipe.adam_beta1,
        adam_beta2=recipe.adam_beta2,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        bf16=recipe.bf16,
        # Under FSDP with fsdp_activation_checkpointing, FSDP checkpoints each wrapped layer itself.
        gradient_checkpointing=recipe.gradient_checkpointing and not fsdp_checkpoints_activations(),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,  # our data step already truncated to recipe.max_length
        logging_steps=recipe.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=recipe.eval_steps,
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        report_to=recipe.report_to,
        seed=recipe.seed,
        use_cpu=not torch.cuda.is_available(),
        # Our dataset already holds input_ids and labels, masked and truncated exactly as `preview` shows.
        dataset_kwargs={"skip_prepare_dataset": True},
        ddp_find_unused_parameters=False,
        # Examples concatenated into one row with restarting position_ids: no padding is computed, and the
        # attention mask built from the position ids keeps examples from seeing each other.
        padding_free=padding_free(recipe),
        train_sampling_strategy=recipe.train_sampling_strategy,
        use_liger_kernel=liger_active(recipe.use_liger_kernel),
    )


def run(recipe: Recipe) -> Path:
    """Train and write the adapter; returns ``output_dir``."""
    started = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = gradient_accumulation_steps(recipe, world_size)  # fails before anything loads
    log(
        f"world size {world_size} x micro-batch {recipe.per_device_train_batch_size} x gradient accumulation "
        f"{accumulation} = global batch {recipe.global_batch_size}"
    )

    # --- Tokenizer and data (cheap, so they fail before the model loads)
    from .data import train_and_eval
    from .tokenizer import tokenizer_for

    import torch
    from accelerate import PartialState

    tokenizer = tokenizer_for(recipe)
    # The main process fills the datasets cache; the other ranks then read it instead of racing to write it.
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        train_dataset, eval_dataset, report = train_and_eval(recipe, tokenizer)
    log(report.summary())
    log(f"tokens per optimizer step ~ {report.mean_length * recipe.global_batch_size:,.0f} "
        f"({report.mean_length:.0f} mean x {recipe.global_batch_size})")

    # --- Base and adapter (seeded first: LoRA's A matrices are drawn at random)
    from transformers import set_seed

    from .modeling import add_adapter, available_attention, count_parameters, liger_active, load_base_model, trainable_line

    set_seed(recipe.seed)
    model = add_adapter(load_base_model(recipe), recipe)
    log(trainable_line(*count_parameters(model)))

    # --- Train (resuming if output_dir holds checkpoints)
    from .resilience import NonFiniteError, NonFiniteGuard, RunStateCallback, StopOnSignal, resume_checkpoint, resume_note
    from .trainer import RecipeTrainer, uses_fused_loss

    checkpoint = resume_checkpoint(recipe)
    if checkpoint:
        log(resume_note(checkpoint, accumulation, world_size))
    elif recipe.overwrite_output_dir and is_main_process():
        for old in Path(recipe.output_dir).glob("checkpoint-*"):
            shutil.rmtree(old)
    stopper = StopOnSignal()
    fused_loss = uses_fused_loss(recipe.lm_head_loss)
    log(f"loss: {'TRL fused LM head (no full logits)' if fused_loss else 'model cross-entropy'}; "
        f"attention: {available_attention(recipe.attn_implementation)}; padding-free: {padding_free(recipe)}; "
        f"liger-kernel: {'on' if liger_active(recipe.use_liger_kernel) else 'off'}")
    trainer = RecipeTrainer(
        model=model,
        fused_loss=fused_loss,
        args=trainer_config(recipe, accumulation, has_eval=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard(), stopper, RunStateCallback(accumulation, world_size)],
    )
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteError as error:
        raise TrainingStopped(str(error), exit_code=3) from None
    log_every_rank(trainer.data_line())
    if stopper.signal:
        from transformers.trainer_utils import get_last_checkpoint

        raise TrainingStopped(
            f"stopped by signal {stopper.signal} at step {trainer.state.global_step}; checkpoint saved at "
            f"{get_last_checkpoint(recipe.output_dir)}; run the same command again to resume",
            exit_code=128 + stopper.signal,
        )

    # --- Artifacts: staged, then published, by the main process only
    from .artifacts import final_losses, publish_directory, remove_pickles, write_run_files
    from .card import library_versions
    from .sources import dataset_version
    from .tokenizer import save_tokenizer

    output_dir = Path(recipe.output_dir)
    staging = output_dir / ".staging-final"
    trainer.save_model(str(staging))  # collective under FSDP/DeepSpeed: every rank calls it
    if eval_dataset is not None:
        trainer.evaluate()  # the final eval loss, logged like the others
    if trainer.is_world_process_zero():
        from .resilience import check_saved_adapter

        check_saved_adapter(staging, recipe, trainer.state.global_step)
        remove_pickles(staging)
        save_tokenizer(tokenizer, staging)
        train_loss, eval_loss = final_losses(trainer.state.log_history)
        results = {
            "final train loss": train_loss,
            "final eval loss": eval_loss if eval_dataset is not None else "no held-out set",
            "optimizer steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0, 3),
            "training examples": len(train_dataset),
            "tokens per epoch (supervised)": f"{report.total_tokens:,} ({report.supervised_tokens:,})",
            "wall time (s)": round(time.time() - started, 1),
            "dataset": dataset_version(recipe),
            "libraries": library_versions(),
        }
        derived = {"gradient_accumulation_steps": accumulation, "world_size": world_size}
        write_run_files(staging, recipe, derived, results, trainer.state.log_history)
        publish_directory(staging, output_dir)
        log(f"adapter written to {output_dir}")
        if recipe.push_to_hub:
            from .push import push

            url = push(output_dir, recipe.hub_model_id, private=recipe.hub_private_repo)
            log(f"pushed to {url}")
    trainer.accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nRecipe keys (defaults are the seed recipe):")
        from .config import FIELD_NAMES, Recipe as _R

        defaults = _R()
        for name in FIELD_NAMES:
            print(f"  --{name} {getattr(defaults, name)!r}")
        return 0
    try:
        config_path, overrides = parse_cli_overrides(argv)
        recipe = load_recipe(config_path, overrides)
        run(recipe)
    except RecipeError as error:
        print(f"hf-lora-recipe: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if is_main_process():
            print(f"hf-lora-recipe: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
