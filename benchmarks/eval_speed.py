"""eval's generation and scoring against a bare ``model.generate`` and a bare forward, side by side, on SmolLM2.

    make bench-eval   # or: .venv/bin/python benchmarks/eval_speed.py [--examples 16] [--batch_size 8]

The held-out set is the demo's review-sentiment rows through SmolLM2's ChatML template; the model is SmolLM2 (the
dequantized Q4_1 copy ``hf-lora-recipe base`` builds, fp32) with a LoRA adapter (r=16, all seven projections, B drawn
non-zero so it changes the model). Rows, one run, alternating order:

* eval's generation (``evaluation/scoring.greedy_replies``: length-sorted, left-padded batches, KV cache, stops at
  the end-of-turn token) against ``model.generate`` on the very same batches (the bare call, no sorting, no
  bookkeeping), at the reply budget eval now chooses (the references' 95th percentile plus a quarter) and at the
  old fixed 256;
* eval's scoring (``response_loss``) against a bare forward over the same padded batches;
* the trainer's final evaluate keeping each example's loss (what lets ``train``'s end-of-training evaluation skip
  scoring the adapter: ``RecipeTrainer.final_evaluate``) against the same forward with labels, keeping nothing.

Generated tokens/s counts tokens up to and including each reply's end-of-turn token. Printed only (copy the
table into benchmarks/RESULTS.md by hand).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def bare_generate(model, batches, pad_id: int, eos_id: int, max_new_tokens: int) -> int:
    """``model.generate`` on each batch as eval pads it; returns the tokens generated up to each reply's stop."""
    generated = 0
    for input_ids, mask in batches:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        for row in output[:, input_ids.shape[1] :].tolist():
            generated += row.index(eos_id) + 1 if eos_id in row else len(row)
    return generated


def padded(examples, order, batch_size: int, pad_id: int, left: bool, field: str):
    import torch

    batches = []
    for start in range(0, len(order), batch_size):
        rows = [getattr(examples[i], field) for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[n, span], mask[n, span] = torch.tensor(r), 1
        batches.append((ids, mask))
    return batches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.data.readers import Rows
    from hf_lora_recipe.devtools.demo import make_dataset
    from hf_lora_recipe.devtools.real_base import materialise_smollm2
    from hf_lora_recipe.evaluation.scoring import greedy_replies, prepare_examples, reply_budget, response_loss
    from hf_lora_recipe.recipe.schema import LLAMA_PROJECTIONS, Recipe
    from hf_lora_recipe.templates.llama2 import special_ids
    from hf_lora_recipe.templates.tokenizer import load_tokenizer
    from hf_lora_recipe.training.trainer import example_loss_sums

    base = materialise_smollm2()
    tokenizer = load_tokenizer(str(base), template="native")
    _, held_out = make_dataset(num_train=2, num_eval=args.examples, seed=0)
    recipe = Recipe(model_name_or_path=str(base), chat_template="native", max_length=128)
    rows = Rows(Dataset.from_list(held_out), ["rows"], [0], ["rows"], [None])
    examples = prepare_examples(build_sft_dataset(recipe, tokenizer, rows)[0], tokenizer)
    eos_id = special_ids(tokenizer).eos_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_PROJECTIONS), init_lora_weights=False)
    model = get_peft_model(model, config).eval()

    budget = reply_budget(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    prompts = padded(examples, order, args.batch_size, pad_id, left=True, field="prompt_ids")
    rows_for_loss = padded(
        examples,
        sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids)),
        args.batch_size,
        pad_id,
        left=False,
        field="input_ids",
    )

    def eval_generate(limit: int) -> int:
        replies, stopped = greedy_replies(model, examples, eos_id, pad_id, limit, args.batch_size, progress=False)
        return sum(len(r) + s for r, s in zip(replies, stopped))

    def bare_forward() -> int:
        with torch.no_grad():
            for ids, mask in rows_for_loss:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        return sum(len(e.input_ids) for e in examples)

    def forward_with_loss(keep_example_losses: bool) -> int:
        """The trainer's evaluate as train runs it: its forward with labels (the loss); its final one also keeps
        each example's loss from the same logits (``example_loss_sums``)."""
        with torch.no_grad():
            for ids, mask in rows_for_loss:
                labels = ids.masked_fill(mask == 0, -100)
                outputs = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                if keep_example_losses:
                    example_loss_sums(outputs, labels, None)
        return sum(len(e.input_ids) for e in examples)

    def eval_score() -> int:
        with torch.no_grad():
            response_loss(model, examples, pad_id, args.batch_size, progress=False)
        return sum(len(e.input_ids) for e in examples)

    pairs = {
        f"generation, reply budget {budget}": (
            lambda: eval_generate(budget),
            lambda: bare_generate(model, prompts, pad_id, eos_id, budget),
        ),
        "generation, the old fixed 256": (
            lambda: eval_generate(256),
            lambda: bare_generate(model, prompts, pad_id, eos_id, 256),
        ),
        "scoring (forward over every row)": (eval_score, bare_forward),
        "trainer's evaluate keeping per-example losses (vs its plain evaluate)": (
            lambda: forward_with_loss(keep_example_losses=True),
            lambda: forward_with_loss(keep_example_losses=False),
        ),
    }
    timings: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in pairs}
    with torch.no_grad():
        eval_generate(2)  # warm-up: first calls allocate
        for repeat in range(args.repeats):
            for name, (ours, bare) in pairs.items():
                first, second = (ours, bare) if repeat % 2 == 0 else (bare, ours)
                figures = {}
                for run in (first, second):
                    start = time.perf_counter()
                    count = run()
                    figures[run] = (time.perf_counter() - start, count)
                timings[name].append((figures[ours][0], figures[bare][0], figures[ours][1], figures[bare][1]))

    print(
        f"\n{args.examples} held-out review rows, batch {args.batch_size}, SmolLM2-135M fp32 + LoRA r=16, "
        f"torch threads {torch.get_num_threads()}; mean of {args.repeats} alternating runs\n"
    )
    print("| pass | eval: s (tokens/s) | bare: s (tokens/s) | eval / bare tokens/s |")
    print("|---|---|---|---|")
    for name, runs in timings.items():
        ours_s = sum(r[0] for r in runs) / len(runs)
        bare_s = sum(r[1] for r in runs) / len(runs)
        ours_t, bare_t = runs[0][2], runs[0][3]
        print(
            f"| {name} | {ours_s:.2f} ({ours_t / ours_s:.0f}) | {bare_s:.2f} ({bare_t / bare_s:.0f}) | "
            f"{(ours_t / ours_s) / (bare_t / bare_s):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
