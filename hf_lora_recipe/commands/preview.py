"""``hf-lora-recipe preview``: the first examples exactly as the trainer consumes them.

    hf-lora-recipe preview --config R.yaml [--model_name_or_path M] [--dataset_name D] [--dataset_format F]
                           [--max_length N] [--num_examples K] [--source NAME] [--json]

Loads only the tokenizer (a tokenizer-only directory works). The human view shows the rendered tokens
with trained ones highlighted (green; between « » when stdout is not a terminal) and masked ones dimmed;
``--json`` prints one object per example with the very ``input_ids`` and ``labels`` (-100 = masked) fed
to the model, and the ``messages`` they were rendered from. With a mixture (``datasets:``), ``--source`` shows
only the examples one source put in it (named as written in the recipe, or by its 0-based index).
"""

from __future__ import annotations

import json
import sys

from hf_lora_recipe import inits
from hf_lora_recipe.recipe.cli_args import RecipeParser, command
from hf_lora_recipe.recipe.schema import NON_NEGATIVE


PARSER = RecipeParser(
    "preview",
    __doc__,
    usage="hf-lora-recipe preview [--config RECIPE.yaml] [--key value ...] [--num_examples K] [--json]",
    plugins=(inits.RECIPE_KEY,),
)
PARSER.add_number("--num_examples", int, NON_NEGATIVE, 3, "examples to show")
PARSER.add_argument(
    "--source",
    default=None,
    metavar="NAME",
    help="a mixture's examples from this datasets entry only (its name or 0-based index)",
)
PARSER.add_flag("--json", help="one JSON line per example: messages, input_ids, labels (-100 = masked)")


@command
def main(argv: list[str]) -> int:
    recipe, options = PARSER.parse_recipe(argv)

    from hf_lora_recipe.data.label_audit import render_example
    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.templates.tokenizer import tokenizer_for

    index = None
    if options.source is not None:  # named wrong: said before the tokenizer loads
        from hf_lora_recipe.data.mixture import SOURCE_COLUMN, source_index

        index = source_index(recipe, options.source)
    tokenizer = tokenizer_for(recipe)
    dataset, report = build_sft_dataset(recipe, tokenizer)
    if index is not None:
        dataset = dataset.filter(lambda source: source == index, input_columns=SOURCE_COLUMN)
    records = [dataset[i] for i in range(min(options.num_examples, len(dataset)))]
    if options.json:
        for record in records:
            print(json.dumps({k: record[k] for k in ("messages", "input_ids", "labels")}, ensure_ascii=False))
        return 0
    color = sys.stdout.isatty()
    print(report.summary())
    for index, record in enumerate(records):
        print(f"\n--- example {index}")
        print(render_example(record, tokenizer, color))
    return 0
