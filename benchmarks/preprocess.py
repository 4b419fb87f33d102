"""Preprocessing throughput: our batched, cached pipeline vs the seed's per-example loop, side by side.

    make bench            # or: .venv/bin/python benchmarks/preprocess.py [--rows 52002]

52k Alpaca-shaped rows (the real 999-row sample repeated) and the real Llama-2 tokenizer from ../shared.
Ours = format + tokenize + mask + truncate + label audit; the seed = two tokenizer calls per row (prompt,
prompt + response) and a label list, no audit. Our second run reads the datasets cache. The floor row is the
tokenizer's own work in our pipeline and nothing else: every turn batch-encoded and every response batch-decoded
(the audit's text check), 1000 rows per call as the map does; no pipeline over the same tokenizer can beat it.
Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_LORA_RECIPE_SHARED", REPO_ROOT.parent / "shared"))


def seed_loop(rows: list[dict], tokenizer, max_length: int) -> int:
    """The seed's preprocessing: one example at a time, the prompt tokenized twice."""
    kept = 0
    for row in rows:
        user = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        prompt = f"<s>[INST] {user} [/INST]"
        full = f"{prompt} {row['output']} </s>"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        labels = ([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])[:max_length]
        kept += any(label != -100 for label in labels)
    return kept


def tokenizer_floor(rows: list[dict], tokenizer, batch: int = 1000) -> None:
    """Our pipeline's tokenizer calls alone: one batch encode of the turns, one batch decode of the responses."""
    from hf_lora_recipe.templates.llama2 import assistant_chunk, decode_texts, encode_texts, user_chunk

    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        users = [user_chunk(row["instruction"] + (f"\n{row['input']}" if row["input"] else "")) for row in chunk]
        encoded = encode_texts(tokenizer, users + [assistant_chunk(row["output"]) for row in chunk])
        decode_texts(tokenizer, encoded[len(chunk) :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=52002)
    parser.add_argument("--max_length", type=int, default=512)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "cache")  # a cold cache for the first run
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    import datasets
    import transformers

    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    sample = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())
    rows = (sample * (args.rows // len(sample) + 1))[: args.rows]
    data_path = work / "alpaca_52k.json"
    data_path.write_text(json.dumps(rows))
    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "llama2"))
    recipe = Recipe(dataset_name=str(data_path), max_length=args.max_length)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    seed_kept = seed_loop(rows, tokenizer, args.max_length)
    timings["seed loop (per example, 2 tokenizer calls)"] = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer_floor(rows, tokenizer)
    timings["floor: the tokenizer's batch encode + audit decode alone"] = time.perf_counter() - started
    started = time.perf_counter()
    dataset, report = build_sft_dataset(recipe, tokenizer)
    timings["ours, first run (incl. label audit)"] = time.perf_counter() - started
    started = time.perf_counter()
    cached, _ = build_sft_dataset(recipe, tokenizer)
    timings["ours, second run (datasets cache)"] = time.perf_counter() - started
    assert cached["input_ids"][:50] == dataset["input_ids"][:50] and len(cached) == len(dataset) == seed_kept

    baseline = timings["seed loop (per example, 2 tokenizer calls)"]
    lines = [
        f"### Preprocessing, {datetime.date.today()} - {args.rows} rows, max_length {args.max_length}, Llama-2 tokenizer",
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"transformers {transformers.__version__}, datasets {datasets.__version__}",
        "",
        "| pipeline | seconds | rows/s | speed vs seed loop |",
        "|---|---|---|---|",
    ]
    for name, seconds in timings.items():
        lines.append(f"| {name} | {seconds:.2f} | {args.rows / seconds:,.0f} | {baseline / seconds:.1f}x |")
    lines += ["", report.summary(), ""]
    table = "\n".join(lines)
    print(table)
    with open(REPO_ROOT / "benchmarks" / "RESULTS.md", "a") as results:
        results.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
