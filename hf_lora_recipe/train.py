"""Train a LoRA / QLoRA adapter from a recipe.

    hf-lora-recipe train --config R.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_lora_recipe.train --config R.yaml [...]

Both run :func:`run`: launch check -> tokenizer & data -> base & adapter -> TRL SFTTrainer -> train -> artifacts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import log
from .arguments import RecipeParser, command
from .config import Recipe, gradient_accumulation_steps


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

    def derived(self) -> dict[str, int]:
        return {"gradient_accumulation_steps": self.accumulation, "world_size": self.world_size}


def check_launch(recipe: Recipe) -> Launch:
    """The accumulation for this launch's world size; an indivisible global batch fails before anything loads."""
    world_size = log.world_size()
    launch = Launch(world_size, gradient_accumulation_steps(recipe, world_size))
    log.info(f"world size {world_size} x micro-batch {recipe.per_device_train_batch_size} x gradient accumulation "
             f"{launch.accumulation} = global batch {recipe.global_batch_size}")
    return launch


def run(recipe: Recipe) -> Path:
    """Train and write the adapter; returns ``output_dir``."""
    started = time.time()
    launch = check_launch(recipe)

    import torch
    from accelerate import PartialState
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from .artifacts import save_run
    from .data import train_and_eval
    from .modeling import add_adapter, count_parameters, load_base_model, trainable_line
    from .quiet import quiet_libraries
    from .resilience import NonFiniteError, NonFiniteGuard, RunStateCallback, StopOnSignal, prepare_output_dir
    from .tokenizer import tokenizer_for
    from .trainer import build_trainer, check_report_to, speed_line

    quiet_libraries()
    check_report_to(recipe)

    # --- Tokenizer and data: cheap, so they fail before the model loads. The main process fills the
    # datasets cache; the other ranks then read it instead of racing to write it.
    tokenizer = tokenizer_for(recipe)
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        train_dataset, eval_dataset, report = train_and_eval(recipe, tokenizer)
    log.info(report.summary())
    log.info(f"tokens per optimizer step ~ {report.mean_length * recipe.global_batch_size:,.0f} "
             f"({report.mean_length:.0f} mean x {recipe.global_batch_size})")

    # --- Base and adapter (seeded first: LoRA's A matrices are drawn at random)
    set_seed(recipe.seed)
    model = add_adapter(load_base_model(recipe), recipe)
    log.info(trainable_line(*count_parameters(model)))

    # --- Trainer, resuming when output_dir holds checkpoints
    checkpoint = prepare_output_dir(recipe, launch.accumulation, launch.world_size)
    stopper = StopOnSignal()
    log.info(speed_line(recipe))
    trainer = build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset, launch.accumulation,
                            callbacks=[NonFiniteGuard(), stopper, RunStateCallback(launch.accumulation, launch.world_size)])

    # --- Train
    try:
        outcome = trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteError as error:
        raise TrainingStopped(str(error), exit_code=3) from None
    log.every_rank(trainer.data_line())
    if stopper.signal:
        raise TrainingStopped(
            f"stopped by signal {stopper.signal} at step {trainer.state.global_step}; checkpoint saved at "
            f"{get_last_checkpoint(recipe.output_dir)}; run the same command again to resume",
            exit_code=128 + stopper.signal,
        )

    # --- Artifacts: staged, checked, then published (and pushed) by the main process only
    return save_run(trainer, recipe, tokenizer, report, launch.derived(), outcome.training_loss, started)


PARSER = RecipeParser("train", __doc__,
                      epilog="Precedence: the seed defaults shown < the --config YAML < flags given here.")


@command
def main(argv: list[str]) -> int:
    recipe, _ = PARSER.parse_recipe(argv)
    try:
        run(recipe)
    except TrainingStopped as stopped:
        if log.is_main_process():
            print(f"hf-lora-recipe: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
