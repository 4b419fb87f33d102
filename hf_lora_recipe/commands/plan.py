"""``hf-lora-recipe plan``: parameters, memory, time and pitfalls of a recipe, from ``config.json`` alone.

    hf-lora-recipe plan --config R.yaml [--model_config PATH_OR_REPO] [--gpu NAME] [--gpu_memory_gb G]
                        [--num_gpus N] [--mfu F] [--json]

No weights are read (but for the rows of the chat template's special tokens, when the base is on this machine:
:mod:`hf_lora_recipe.templates.untrained_tokens`). The model is built on the meta device from its config and the recipe's real
``LoraConfig`` is applied with PEFT, so parameter counts are exact for any architecture transformers
knows. Memory and time are estimates from the formulas below, each stated in the output.
"""

from __future__ import annotations

import json

from hf_lora_recipe import inits
from hf_lora_recipe.planning.estimates import (
    GPUS,
)
from hf_lora_recipe.planning.plan import make_plan, render
from hf_lora_recipe.recipe.cli_args import RecipeParser, command
from hf_lora_recipe.recipe.schema import COUNT, POSITIVE, SHARE


PARSER = RecipeParser(
    "plan",
    __doc__,
    usage="hf-lora-recipe plan [--config RECIPE.yaml] [--key value ...] "
    "[--model_config PATH_OR_REPO] [--gpu NAME] [--gpu_memory_gb G] [--num_gpus N] [--mfu F] [--json]",
    plugins=(inits.RECIPE_KEY,),
)
PARSER.add_argument("--model_config", help="config.json, a folder with one, or a Hub id (default: the recipe's model)")
PARSER.add_argument(
    "--gpu", default="24GB", choices=list(GPUS), metavar="NAME", help=f"one of {', '.join(GPUS)} (default: 24GB)"
)
PARSER.add_number("--gpu_memory_gb", float, POSITIVE, None, "override the GPU's memory (GiB)")
PARSER.add_number("--num_gpus", int, COUNT, 1, "GPUs the run is spread over")
PARSER.add_number(
    "--mfu",
    float,
    SHARE,
    0.4,
    "model FLOPs utilisation assumed for the time estimate",
)
PARSER.add_flag("--json", help="the plan as one JSON object")


@command
def main(argv: list[str]) -> int:
    recipe, options = PARSER.parse_recipe(argv)
    plan = make_plan(recipe, options.model_config, options.gpu, options.gpu_memory_gb, options.num_gpus, options.mfu)
    print(json.dumps(plan, default=str) if options.json else render(plan))
    return 1 if any(l["level"] == "error" for l in plan["lints"]) else 0
