"""``hf-lora-recipe preview``: the first examples exactly as the trainer consumes them.

    hf-lora-recipe preview --config R.yaml [--model_name_or_path M] [--dataset_name D] [--dataset_format F]
                           [--max_length N] [--num_examples K] [--json]

Loads only the tokenizer (a tokenizer-only directory works). The human view shows the rendered tokens
with trained ones highlighted (green; between « » when stdout is not a terminal) and masked ones dimmed;
``--json`` prints one object per example with the very ``input_ids`` and ``labels`` (-100 = masked) fed
to the model, and the ``messages`` they were rendered from.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .config import RecipeError, load_recipe, parse_cli_overrides
from .template import IGNORE_INDEX

TRAINED, MASKED, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_example(example: dict, tokenizer: Any, color: bool) -> str:
    """Decode runs of masked / trained tokens; special tokens are shown, so BOS and EOS are visible."""
    pieces: list[str] = []
    input_ids, labels = example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            trained = labels[start] != IGNORE_INDEX
            if color:
                pieces.append(f"{TRAINED if trained else MASKED}{text}{RESET}")
            else:
                pieces.append(f"«{text}»" if trained else text)
            start = i
    supervised = sum(1 for y in labels if y != IGNORE_INDEX)
    cut = " (truncated)" if example.get("full_length", 0) > len(input_ids) else ""
    return "".join(pieces) + f"\n  [{len(input_ids)} tokens, {supervised} trained{cut}]"


def preview_records(argv: list[str]) -> tuple[list[dict], Any, Any]:
    num_examples = 3
    as_json = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--json":
            as_json = True
        elif argv[i].startswith("--num_examples"):
            key, _, value = argv[i].partition("=")
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if not value.isdigit():
                raise RecipeError("--num_examples needs a whole number")
            num_examples = int(value)
        else:
            rest.append(argv[i])
        i += 1
    config_path, overrides = parse_cli_overrides(rest)
    recipe = load_recipe(config_path, overrides)

    from .data import build_sft_dataset
    from .tokenizer import tokenizer_for

    tokenizer = tokenizer_for(recipe)
    dataset, report = build_sft_dataset(recipe, tokenizer)
    records = [dataset[i] for i in range(min(num_examples, len(dataset)))]
    return records, tokenizer, (report, as_json)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    try:
        records, tokenizer, (report, as_json) = preview_records(argv)
    except RecipeError as error:
        print(f"hf-lora-recipe preview: error: {error}", file=sys.stderr)
        return 2
    if as_json:
        for record in records:
            print(json.dumps({k: record[k] for k in ("messages", "input_ids", "labels")}, ensure_ascii=False))
        return 0
    color = sys.stdout.isatty()
    print(report.summary())
    for index, record in enumerate(records):
        print(f"\n--- example {index}")
        print(render_example(record, tokenizer, color))
    return 0
