"""``hf-lora-recipe eval``: the base against the adapter (and the merged model) on held-out conversations.

    hf-lora-recipe eval --adapter DIR [--model MERGED_DIR] [--dataset PATH_OR_ID] [--split NAME]
                        [--num_examples N] [--max_new_tokens N] [--batch_size N|auto] [--json] [--no_card]

    hf-lora-recipe eval --model MERGED_DIR [...]   (base vs merged model)

Data: by default the held-out set the run used, from the ``recipe.yaml`` saved beside the adapter: its
``dataset_test_split``, or the ``eval_split_size`` rows split off again exactly as training did (same seed).
``--dataset`` evaluates on other data instead (format detected; ``--split`` picks the split, by default
test, else validation, else train); it is required when the run had no held-out set. The first
``--num_examples`` examples are used, rendered, masked and truncated exactly as in training (the saved
tokenizer and its chat template, the recipe's ``max_length``).

For each model - the base (the adapter switched off), the adapter, the merged model when given:

* response loss: token-weighted mean cross-entropy over the supervised tokens (the training masks), and
  perplexity = exp(loss);
* greedy replies to the conversation up to its last user turn, compared with the last assistant turn:
  the share that stop at the end-of-turn token within ``--max_new_tokens``, their mean length in tokens
  (end-of-turn not counted), exact match (after strip) and ROUGE-L F1 (``rouge_score``, stemmed).

An adapter whose loss and replies equal the base's exactly had no effect (an ignored adapter, or B still
all zero): that is an error. The figures are printed as a table, one column per model (``--json``: the table
goes to stderr and stdout gets one object, ``{"dataset", "split", "num_examples", "max_new_tokens", "models":
{"base": {...}, "adapter": {...}, "merged": {...}}}``), and recorded as the ``## Evaluation`` section of the
adapter's model card - only in a card hf-lora-recipe wrote; ``--no_card`` leaves the card alone.

``train`` runs the same evaluation on ``final_eval_examples`` held-out examples once the adapter is saved. From
Python, with a model already loaded: ``score_base_and_adapter(model, tokenizer, examples_for(recipe, tokenizer,
rows))`` gives each model's :class:`Scores`, replies included.
"""

from __future__ import annotations

import json
import sys

from hf_lora_recipe import log
from hf_lora_recipe.evaluation.scoring import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_EXAMPLES,
    check_adapter_dir,
    check_held_out_unchanged,
    check_model_dir,
    check_same_run,
    choose_data,
    count_trained,
    data_version,
    evaluate_adapter,
    evaluate_merged,
    format_table,
    load_eval_tokenizer,
    load_examples,
    record_in_card,
    run_recipe,
)
from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.recipe.schema import COUNT, RecipeError


PARSER = CommandParser("eval", __doc__)
PARSER.add_argument("--adapter", metavar="DIR", help="the adapter's folder (a training output_dir)")
PARSER.add_argument(
    "--model",
    metavar="MERGED_DIR",
    help="a merged model's folder (hf-lora-recipe merge --output); with --adapter: a third column",
)
PARSER.add_argument(
    "--dataset",
    metavar="PATH_OR_ID",
    help="a local file or folder, or a Hub dataset id (default: the run's held-out set)",
)
PARSER.add_argument(
    "--split",
    metavar="NAME",
    help="the split to evaluate on (default: the run's held-out set; "
    "with --dataset: test, else validation, else train)",
)
PARSER.add_number("--num_examples", int, COUNT, DEFAULT_NUM_EXAMPLES, "the first N examples", metavar="N")
PARSER.add_number(
    "--max_new_tokens",
    int,
    COUNT,
    None,
    "reply length limit; a reply reaching it did not stop. Unset (None): the held-out references' "
    f"95th-percentile length plus a quarter, at most {DEFAULT_MAX_NEW_TOKENS}",
    metavar="N",
)
PARSER.add_number(
    "--batch_size",
    int,
    COUNT,
    DEFAULT_BATCH_SIZE,
    "examples per forward pass and per generate call; auto: each pass sized from memory (as training's auto)",
    metavar="N",
    auto=True,
)
PARSER.add_flag(
    "--allow_training_rows",
    help="score examples the adapter was trained on (refused otherwise); the report calls them training rows",
)
PARSER.add_flag("--json", help="print the report as one JSON object on stdout (the table goes to stderr)")
PARSER.add_flag("--no_card", help="leave the model card alone")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    if args.adapter is None and args.model is None:
        raise RecipeError("give --adapter DIR (base vs adapter), --model MERGED_DIR (base vs merged) or both")
    adapter_dir = check_adapter_dir(args.adapter) if args.adapter is not None else None
    model_dir = check_model_dir(args.model) if args.model is not None else None
    if adapter_dir is not None and model_dir is not None:
        check_same_run(adapter_dir, model_dir)
    source = adapter_dir or model_dir
    recipe = run_recipe(source, adapter_dir, args.dataset)
    data = choose_data(recipe, str(source), args.dataset, args.split)
    version = data_version(data)  # the data's files are hashed once
    check_held_out_unchanged(data, source, version)
    label = version["name"]

    # --- Data before weights: a bad dataset fails in seconds
    tokenizer = load_eval_tokenizer(source)
    dataset = load_examples(data, tokenizer)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else log.info
    count = min(args.num_examples, len(dataset))
    own = args.dataset is None and args.split is None  # the run's own held-out set
    trained = count_trained(dataset.select(range(count)), source, args.allow_training_rows, say, held_out=own)
    say(f"eval: {count} of {len(dataset)} examples of {label} ({data.description})")
    options = {
        "num_examples": args.num_examples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "say": say,
        "dataset": label,
        "split": data.description,
    }

    # --- Models, scored one after the other
    if adapter_dir is not None:
        report = evaluate_adapter(
            data.recipe, adapter_dir, dataset, tokenizer=tokenizer, merged_dir=model_dir, write_card=False, **options
        )
    else:
        report = evaluate_merged(recipe, model_dir, dataset, tokenizer, **options)

    # --- Report
    if trained:
        report["trained_on"] = trained  # the card and the table then call them training rows, never held out
    table = format_table(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)
    if not args.no_card:
        record_in_card(source, report, say)
    return 0
