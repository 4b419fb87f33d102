"""Rows -> conversations -> token ids and labels, with the masking policy of :mod:`template`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError
from .template import IGNORE_INDEX, encode_conversations, special_ids

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {
    "alpaca": {"instruction", "output"},
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
}


@dataclass
class DataReport:
    """What preprocessing did, printed before training so nothing is dropped silently."""

    examples_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples_out: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def mean_length(self) -> float:
        return self.total_tokens / max(self.examples_out, 1)

    def summary(self) -> str:
        lengths = sorted(self.lengths)

        def pct(q: float) -> int:
            return lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0

        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return (
            f"data: {self.examples_in} examples in, {self.examples_out} kept (dropped: {dropped}); "
            f"tokens p50/p90/p99/max {pct(0.5)}/{pct(0.9)}/{pct(0.99)}/{lengths[-1] if lengths else 0}; "
            f"supervised {self.supervised_tokens / max(self.total_tokens, 1):.1%}; "
            f"truncated {self.truncated / max(self.examples_out, 1):.1%}"
        )


def load_rows(recipe: Recipe) -> Any:
    """A local file / directory of files, or a Hub dataset id (with config and split)."""
    from datasets import load_dataset

    path = Path(recipe.dataset_name)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
        if not files or path.is_file() and path.suffix not in LOCAL_BUILDERS:
            raise RecipeError(f"{path}: no {', '.join(LOCAL_BUILDERS)} files to read")
        builders = {LOCAL_BUILDERS[p.suffix] for p in files}
        if len(builders) > 1:
            raise RecipeError(f"{path}: mixes file types {sorted(builders)}; use one")
        return load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")
    return load_dataset(recipe.dataset_name, recipe.dataset_config, split=recipe.dataset_train_split)


def detect_format(columns: list[str]) -> str:
    found = [name for name, needed in FORMAT_COLUMNS.items() if needed <= set(columns)]
    if len(found) != 1:
        raise RecipeError(
            f"dataset_format: auto found {found or 'no known format'} in columns {sorted(columns)}; "
            f"set dataset_format to one of {', '.join(FORMAT_COLUMNS)}"
        )
    return found[0]


def _require_text(value: Any, name: str, row: int) -> str:
    if not isinstance(value, str):
        raise RecipeError(f"row {row}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def alpaca_messages(instruction: Any, input_text: Any, output: Any, row: int) -> list[dict[str, str]]:
    """user = instruction (+ "\\n" + input only when input is non-empty), assistant = output."""
    instruction = _require_text(instruction, "instruction", row)
    output = _require_text(output, "output", row)
    input_text = "" if input_text is None else _require_text(input_text, "input", row)
    user = instruction.strip() + (f"\n{input_text.strip()}" if input_text.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def prompt_completion_messages(prompt: Any, completion: Any, row: int) -> list[dict[str, str]]:
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        return [*prompt, *completion]
    return [
        {"role": "user", "content": _require_text(prompt, "prompt", row)},
        {"role": "assistant", "content": _require_text(completion, "completion", row)},
    ]


def rows_to_messages(batch: dict[str, list], indices: list[int], dataset_format: str) -> dict[str, list]:
    size = len(indices)
    if dataset_format == "alpaca":
        inputs = batch.get("input", [""] * size)
        messages = [
            alpaca_messages(i, x, o, row)
            for i, x, o, row in zip(batch["instruction"], inputs, batch["output"], indices, strict=True)
        ]
    elif dataset_format == "prompt_completion":
        messages = [
            prompt_completion_messages(p, c, row)
            for p, c, row in zip(batch["prompt"], batch["completion"], indices, strict=True)
        ]
    elif dataset_format == "messages":
        messages = [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in batch["messages"]]
    else:
        raise RecipeError(f"dataset_format {dataset_format!r} is not supported yet")
    return {"messages": messages}


def tokenize_batch(batch: dict[str, list], tokenizer: Any, ids: Any, max_length: int) -> dict[str, list]:
    input_ids, labels = encode_conversations(tokenizer, batch["messages"], ids)
    return {
        "input_ids": [x[:max_length] for x in input_ids],  # keep the start: the prompt gives the response meaning
        "labels": [y[:max_length] for y in labels],
        "full_length": [len(x) for x in input_ids],
    }


def build_sft_dataset(recipe: Recipe, tokenizer: Any, rows: Any | None = None) -> tuple[Any, DataReport]:
    """The training dataset exactly as the trainer consumes it: ``messages``, ``input_ids``, ``labels``."""
    rows = load_rows(recipe) if rows is None else rows
    dataset_format = recipe.dataset_format
    if dataset_format == "auto":
        dataset_format = detect_format(rows.column_names)
    missing = FORMAT_COLUMNS.get(dataset_format, set()) - set(rows.column_names)
    if missing:
        raise RecipeError(
            f"dataset {recipe.dataset_name} has no column(s) {sorted(missing)} required by dataset_format "
            f"{dataset_format!r}; it has {sorted(rows.column_names)}"
        )
    report = DataReport(examples_in=len(rows))
    conversations = rows.map(
        rows_to_messages,
        batched=True,
        with_indices=True,
        fn_kwargs={"dataset_format": dataset_format},
        remove_columns=rows.column_names,
        desc="Formatting",
    )
    tokenized = conversations.map(
        tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "ids": special_ids(tokenizer), "max_length": recipe.max_length},
        desc="Tokenizing and masking",
    )
    has_supervision = [any(label != IGNORE_INDEX for label in labels) for labels in tokenized["labels"]]
    kept = tokenized.select([i for i, ok in enumerate(has_supervision) if ok])
    if len(kept) < len(tokenized):
        report.dropped["response cut by max_length"] = len(tokenized) - len(kept)
    if len(kept) == 0:
        raise RecipeError(f"no trainable examples left in {recipe.dataset_name} after preprocessing")
    report.examples_out = len(kept)
    report.lengths = [len(x) for x in kept["input_ids"]]
    report.total_tokens = sum(report.lengths)
    report.supervised_tokens = sum(sum(1 for y in labels if y != IGNORE_INDEX) for labels in kept["labels"])
    report.truncated = sum(1 for full in kept["full_length"] if full > recipe.max_length)
    return kept.remove_columns("full_length"), report
