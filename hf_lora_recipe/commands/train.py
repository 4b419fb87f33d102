"""Train a LoRA / QLoRA adapter from a recipe.

    hf-lora-recipe train --config R.yaml [--key value ...]
    hf-lora-recipe train --accelerate_config accelerate_configs/X.yaml [--num_processes N] --config R.yaml [...]
    accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_lora_recipe.train --config R.yaml [...]

The second checks the run once, in one process, before it starts the launch's processes (a refusal is one line).

Both run :func:`run`: launch check -> checks before loading (output_dir, names, base and LoRA targets on the
meta device, where to start) -> tokenizer (and its template tokens' rows in the base) & data -> base & adapter
-> TRL SFTTrainer -> train -> artifacts.
"""

from __future__ import annotations

import sys

from hf_lora_recipe import inits, log
from hf_lora_recipe.pipeline.launch import launch
from hf_lora_recipe.pipeline.train_run import TrainingStopped, run
from hf_lora_recipe.recipe.cli_args import RecipeParser, command
from hf_lora_recipe.recipe.schema import COUNT


PARSER = RecipeParser(
    "train",
    __doc__,
    epilog="Precedence: the seed defaults shown < the --config YAML < flags given here.",
    plugins=(inits.RECIPE_KEY,),
)


PARSER.add_argument(
    "--accelerate_config",
    metavar="FILE",
    help="check the run, then start it with accelerate launch --config_file FILE (FSDP, DeepSpeed, DDP)",
)
PARSER.add_number("--num_processes", int, COUNT, None, "with --accelerate_config: processes (default: the config's)")
LAUNCH_FLAGS = ("--accelerate_config", "--num_processes")


def _without_launch_flags(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in LAUNCH_FLAGS:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            kept.append(token)
    return kept


@command
def main(argv: list[str]) -> int:
    recipe, options = PARSER.parse_recipe(argv)
    if options.accelerate_config:
        return launch(recipe, _without_launch_flags(argv), options.accelerate_config, options.num_processes)
    try:
        run(recipe)
    except TrainingStopped as stopped:
        if log.is_main_process():
            print(f"hf-lora-recipe: {stopped}", file=sys.stderr)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
