"""Train a LoRA / QLoRA adapter from a recipe.

    hf-lora-recipe train --config R.yaml [--key value ...]
    accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_lora_recipe.train --config R.yaml [...]

Both run :func:`run`: launch check -> checks before loading (output_dir, names, base and LoRA targets on the
meta device, where to start) -> tokenizer (and its template tokens' rows in the base) & data -> base & adapter
-> TRL SFTTrainer -> train -> artifacts.
"""

from __future__ import annotations

import sys

from hf_lora_recipe import inits, log
from hf_lora_recipe.pipeline.train_run import TrainingStopped, run
from hf_lora_recipe.recipe.cli_args import RecipeParser, command


PARSER = RecipeParser(
    "train",
    __doc__,
    epilog="Precedence: the seed defaults shown < the --config YAML < flags given here.",
    plugins=(inits.RECIPE_KEY,),
)


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
