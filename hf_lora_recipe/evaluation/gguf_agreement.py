"""Does llama.cpp, running the exported GGUF, give the adapter's outputs? Measured on held-out prompts, through
the adapter's own chat template (the same token ids on both sides), against transformers + PEFT.

A GGUF base is itself quantized (and llama.cpp quantizes activations for its quantized matmuls), so some
difference is expected before any adapter is involved. That floor is measured in the same run: llama.cpp's base
GGUF against transformers' base, on the same prompts. The export is judged against it:

* first-token logits: the export's mean max|diff| may be at most twice the floor's, plus 0.1 (the adapter's own
  rounding at the exported precision; never more than the base's quantization itself);
* top-1 agreement and greedy replies: the export agrees on at least as many prompts as the base does, less one;
* the adapter is applied: where it moves the logits by more than four times the floor, the export must be closer
  to the adapter than half that move (a LoRA llama.cpp ignored, or scaled wrongly, fails here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lora_recipe.evaluation.scoring import Example, greedy_replies
from hf_lora_recipe.recipe.schema import RecipeError
from hf_lora_recipe.upstream import llama_cpp


FLOOR_FACTOR, FLOOR_SLACK = 2.0, 0.1
APPLIED_FACTOR = 4.0
VERIFY_REPLY_CAP = 64  # tokens per greedy reply: enough to see a reply stop or drift, short enough to run on a CPU


@dataclass
class Side:
    """One model pair (llama.cpp vs transformers) on every prompt."""

    max_diffs: list[float]
    top1: list[bool]
    replies_equal: list[bool]
    replies: list[str] = dataclasses.field(default_factory=list)  # llama.cpp's, decoded

    @property
    def mean_max_diff(self) -> float:
        return sum(self.max_diffs) / len(self.max_diffs)


@dataclass
class Agreement:
    floor: Side  # llama.cpp's base GGUF vs transformers' base
    export: Side  # the export vs transformers + the adapter
    effect: float  # mean max|diff| between transformers' adapter and base: how much the adapter moves the logits
    prompts: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "floor": dataclasses.asdict(self.floor) | {"mean_max_diff": self.floor.mean_max_diff},
            "export": dataclasses.asdict(self.export) | {"mean_max_diff": self.export.mean_max_diff},
            "adapter_effect": self.effect,
            "prompts": self.prompts,
            "problems": self.problems(),
        }

    def problems(self) -> list[str]:
        n = len(self.export.top1)
        found = []
        limit = FLOOR_FACTOR * self.floor.mean_max_diff + FLOOR_SLACK
        if self.export.mean_max_diff > limit:
            found.append(f"first-token logits differ by {self.export.mean_max_diff:.3f} (at most {limit:.3f} allowed)")
        if sum(self.export.top1) < sum(self.floor.top1) - 1:
            found.append(
                f"top-1 agrees on {sum(self.export.top1)}/{n} prompts, the base on {sum(self.floor.top1)}/{n}"
            )
        if sum(self.export.replies_equal) < sum(self.floor.replies_equal) - 1:
            found.append(
                f"greedy replies match on {sum(self.export.replies_equal)}/{n}, the base's on "
                f"{sum(self.floor.replies_equal)}/{n}"
            )
        if self.effect > APPLIED_FACTOR * self.floor.mean_max_diff and self.export.mean_max_diff > self.effect / 2:
            found.append(f"the adapter moves the logits by {self.effect:.3f} and llama.cpp is not closer to it")
        return found

    def table(self) -> str:
        n = len(self.export.top1)
        rows = [
            ("", "base GGUF vs base", "export vs adapter"),
            (
                "first-token logits, mean max|diff|",
                f"{self.floor.mean_max_diff:.3f}",
                f"{self.export.mean_max_diff:.3f}",
            ),
            ("first-token top-1 agreement", f"{sum(self.floor.top1)}/{n}", f"{sum(self.export.top1)}/{n}"),
            (
                "greedy replies identical",
                f"{sum(self.floor.replies_equal)}/{n}",
                f"{sum(self.export.replies_equal)}/{n}",
            ),
        ]
        lines = [f"{a:<36}{b:>20}{c:>20}" for a, b, c in rows]
        lines.append(f"(the adapter itself moves transformers' first-token logits by {self.effect:.3f})")
        return "\n".join(lines)


def _compare(
    llm: Any,
    model: Any,
    examples: list[Example],
    ids: tuple[int, int],
    max_new_tokens: int,
    label: str,
    tokenizer: Any,
) -> Side:
    """llama.cpp's ``llm`` against transformers' ``model``; ``ids``: (end-of-turn, pad)."""
    import numpy as np

    max_diffs, top1 = [], []
    for example in examples:
        ours = llama_cpp.logits(llm, example.prompt_ids)
        theirs = _last_logits(model, example.prompt_ids)
        max_diffs.append(float(np.abs(ours - theirs).max()))
        top1.append(int(ours.argmax()) == int(theirs.argmax()))
    reference, _ = greedy_replies(model, examples, *ids, max_new_tokens, batch_size=8, label=label, progress=False)
    replies = [llama_cpp.greedy(llm, e.prompt_ids, {ids[0]}, max_new_tokens) for e in examples]
    return Side(max_diffs, top1, [a == b for a, b in zip(replies, reference)], tokenizer.batch_decode(replies))


def measure(
    adapter_model: Any,
    tokenizer: Any,
    examples: list[Example],
    base_gguf: Path,
    export_model: Path,
    export_lora: Path | None,
    max_new_tokens: int,
) -> Agreement:
    """Agreement of the export (``export_model`` with ``export_lora`` applied, or the merged ``export_model``) with
    ``adapter_model`` (a PeftModel), and of ``base_gguf`` with its base, on ``examples``' prompts."""
    import numpy as np

    from hf_lora_recipe.templates.llama2 import special_ids

    eos_id = special_ids(tokenizer).eos_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids = (eos_id, pad_id)
    context = max(len(e.prompt_ids) for e in examples) + max_new_tokens + 8
    with adapter_model.disable_adapter():
        base_logits = [_last_logits(adapter_model, e.prompt_ids) for e in examples]
        with llama_cpp.loaded(base_gguf, None, context) as llm:
            floor = _compare(llm, adapter_model, examples, ids, max_new_tokens, "base", tokenizer)
    adapted_logits = [_last_logits(adapter_model, e.prompt_ids) for e in examples]
    effect = float(np.mean([np.abs(a - b).max() for a, b in zip(adapted_logits, base_logits)]))
    with llama_cpp.loaded(export_model, export_lora, context) as llm:
        export = _compare(llm, adapter_model, examples, ids, max_new_tokens, "adapter", tokenizer)
    return Agreement(floor, export, effect)


def _last_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu().numpy()


def check(agreement: Agreement, where: str) -> None:
    problems = agreement.problems()
    if problems:
        raise RecipeError(f"{where}: llama.cpp does not reproduce the adapter: {'; '.join(problems)}")


def verify_export(
    exported: Any, data: Any, num_prompts: int, max_new_tokens: int | None, floor_gguf: Path
) -> Agreement:
    """Measure and check ``exported`` (shipping/gguf_export.Exported) on the first ``num_prompts`` of ``data``
    (evaluation/scoring.EvalData); ``floor_gguf``: the base GGUF the floor is measured with."""
    from hf_lora_recipe.evaluation.scoring import (
        load_adapter,
        load_eval_tokenizer,
        load_examples,
        prepare_examples,
        reply_budget,
    )

    tokenizer = load_eval_tokenizer(exported.adapter_dir)
    dataset = load_examples(data, tokenizer)
    examples = prepare_examples(dataset.select(range(min(num_prompts, len(dataset)))), tokenizer)
    if not examples:
        raise RecipeError(f"{data.description}: no examples to verify the export on; pass --dataset PATH_OR_ID")
    budget = max_new_tokens or reply_budget(examples, cap=VERIFY_REPLY_CAP)
    # the base unquantized, in fp32: a GGUF base is its own quantization (or none), never bitsandbytes' NF4, so the
    # dense weights are what both runtimes start from
    dense = dataclasses.replace(data.recipe, load_in_4bit=False, bf16=False)
    model = load_adapter(dense, exported.adapter_dir)
    agreement = measure(model, tokenizer, examples, floor_gguf, exported.model, exported.lora, budget)
    agreement.prompts = [tokenizer.decode(e.prompt_ids) for e in examples]
    return agreement
