"""``make demo``: the whole recipe end to end, offline, in a few minutes on a laptop CPU.

Builds everything it needs - an instruction dataset, a byte-level BPE tokenizer and a tiny random
Llama-architecture base - then fine-tunes a QLoRA adapter with ``recipes/tiny-demo.yaml`` (the seed recipe
scaled down), and compares base and adapter on held-out prompts by exact match. The base is frozen: the
gain can only come from the adapter.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from .arguments import RecipeParser, command

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO_ROOT / "recipes" / "tiny-demo.yaml"

POSITIVE = ["wonderful", "great", "delightful", "excellent", "lovely", "brilliant", "charming", "superb", "fun", "moving"]
NEGATIVE = ["awful", "boring", "dreadful", "terrible", "dull", "clumsy", "tedious", "painful", "bland", "messy"]
SUBJECTS = ["the movie", "the book", "the concert", "the meal", "the trip", "the play", "the game", "the show"]
FILLERS = ["honestly", "overall", "to be fair", "in the end", "for me", "as expected"]
PHRASINGS = {
    "sentiment": ["Classify the sentiment of this review.", "Is this review positive or negative?",
                  "Label the sentiment."],
    "parity": ["Is {n} even or odd?", "Tell me whether {n} is even or odd.", "Even or odd: {n}"],
}


def _sentiment_example(rng: random.Random, phrasing: str) -> dict[str, str]:
    label = rng.choice(["positive", "negative"])
    words = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    review = f"{rng.choice(SUBJECTS)} was {words[0]} and {words[1]}, {rng.choice(FILLERS)}."
    return {"instruction": phrasing, "input": review, "output": label}


def _parity_example(rng: random.Random, phrasing: str) -> dict[str, str]:
    number = rng.randrange(0, 1000)
    return {"instruction": phrasing.format(n=number), "input": "", "output": "even" if number % 2 == 0 else "odd"}


def make_dataset(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Alpaca-format rows; held-out rows never occur verbatim in training."""
    rng = random.Random(seed)
    makers = {"sentiment": _sentiment_example, "parity": _parity_example}
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < num_train + num_eval:
        task = rng.choice(list(makers))
        row = makers[task](rng, rng.choice(PHRASINGS[task]))
        key = row["instruction"] + row["input"]
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows[:num_train], rows[num_train:]


def make_tokenizer(texts: list[str], output_dir: Path) -> Any:
    """A byte-level BPE trained on the demo corpus, with Llama-2's special tokens and BOS behaviour."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts + ["[INST] [/INST]"], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def exact_match(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int = 8) -> tuple[float, list[str]]:
    """Greedy generation through the training template; a hit must match the answer and then stop (EOS)."""
    import torch

    from .formats import alpaca_conversation
    from .template import encode_prompt, special_ids

    ids = special_ids(tokenizer)
    hits, outputs = 0, []
    for row in rows:
        messages = alpaca_conversation(row["instruction"], row["input"], row["output"])[0][:1]
        prompt = torch.tensor([encode_prompt(tokenizer, messages, ids)])
        with torch.no_grad():
            generated = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=ids.eos_id, pad_token_id=tokenizer.pad_token_id,
            )[0, prompt.shape[1]:].tolist()
        stopped = ids.eos_id in generated
        text = tokenizer.decode(generated[: generated.index(ids.eos_id)] if stopped else generated).strip()
        hits += stopped and text == row["output"]
        outputs.append(text)
    return hits / len(rows), outputs


PARSER = RecipeParser("demo", __doc__, usage="python -m hf_lora_recipe.demo [--key value ...]")


@command
def main(argv: list[str]) -> int:
    # The demo rebuilds its base and data every time, so it trains from scratch rather than resuming.
    recipe, _ = PARSER.parse_recipe(["--config", str(DEMO_RECIPE), "--overwrite_output_dir", "true", *argv])

    import torch

    from .tiny import build_tiny_llama
    from .tokenizer import load_tokenizer
    from .train import run

    started = time.time()
    work = Path(recipe.output_dir).parent
    data_path, base_path = Path(recipe.dataset_name), Path(recipe.model_name_or_path)
    for path in (data_path.parent, base_path):
        path.mkdir(parents=True, exist_ok=True)

    print("== 1/4 building the demo's data, tokenizer and tiny base (random weights)")
    train_rows, eval_rows = make_dataset(num_train=3000, num_eval=200, seed=recipe.seed)
    data_path.write_text(json.dumps(train_rows))
    make_tokenizer([r["instruction"] + "\n" + r["input"] + " " + r["output"] for r in train_rows], base_path)
    tokenizer = load_tokenizer(str(base_path))
    build_tiny_llama(tokenizer, base_path, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, seed=recipe.seed)
    print(f"   {len(train_rows)} training rows, {len(eval_rows)} held-out rows, vocabulary {len(tokenizer)}; in {work}")

    print("== 2/4 fine-tuning a QLoRA adapter with", DEMO_RECIPE.relative_to(REPO_ROOT))
    adapter_dir = run(recipe)

    print("== 3/4 base vs adapter on held-out prompts (greedy, exact match incl. stopping at EOS)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import quantization_config

    torch.manual_seed(recipe.seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization_config(recipe), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with model.disable_adapter():
        base_accuracy, base_outputs = exact_match(model, tokenizer, eval_rows)
    adapter_accuracy, adapter_outputs = exact_match(model, tokenizer, eval_rows)
    print(f"\n   {'model':<28}{'exact match':>12}")
    print(f"   {'base (NF4, frozen)':<28}{base_accuracy:>12.1%}")
    print(f"   {'base + LoRA adapter':<28}{adapter_accuracy:>12.1%}")

    print("\n== 4/4 PeftModel.from_pretrained + generate on a few held-out prompts")
    for row, before, after in list(zip(eval_rows, base_outputs, adapter_outputs))[:4]:
        prompt = row["instruction"] + (f" / {row['input']}" if row["input"] else "")
        print(f"   {prompt}\n      expected {row['output']!r:<12} base {before[:24]!r:<28} adapter {after!r}")
    print(f"\ndemo finished in {time.time() - started:.0f} s; adapter in {adapter_dir}")
    return 0 if adapter_accuracy > base_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
