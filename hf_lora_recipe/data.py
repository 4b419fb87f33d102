"""Rows -> conversations -> token ids and labels, audited, exactly as the trainer consumes them.

Every step is a batched ``datasets`` map over an Arrow-backed table, so a second run with the same data,
tokenizer and settings reads the cache instead of re-tokenizing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import formats, oasst
from .audit import audit_batch
from .config import Recipe, RecipeError
from .sources import Rows, load_rows
from .template import IGNORE_INDEX, encode_conversations, special_ids


def _source_hash() -> str:
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# datasets keys its cache on the mapped function by reference (module and name), not by its code, so our
# source goes into the key: after an upgrade of this package no stale formatting or masking is reused.
CODE_VERSION = _source_hash()


def _call(values: Any, *indices: Any, step: Callable, step_kwargs: dict, code_version: str) -> Any:
    return step(values, *indices, **step_kwargs)


def _map(dataset: Any, function: Callable, fn_kwargs: dict | None = None, **options: Any) -> Any:
    return dataset.map(
        _call, fn_kwargs={"step": function, "step_kwargs": fn_kwargs or {}, "code_version": CODE_VERSION}, **options
    )


def _filter(dataset: Any, function: Callable, **options: Any) -> Any:
    return dataset.filter(
        _call, fn_kwargs={"step": function, "step_kwargs": {}, "code_version": CODE_VERSION}, **options
    )


def _is_good(problem: str) -> bool:
    return problem == ""


def _is_bad(problem: str) -> bool:
    return problem != ""


def _has_supervision(labels: list[int]) -> bool:
    return any(y != IGNORE_INDEX for y in labels)


@dataclass
class DataReport:
    """What preprocessing did, printed before training so nothing is dropped silently."""

    examples_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples_out: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    @property
    def mean_length(self) -> float:
        return self.total_tokens / max(self.examples_out, 1)

    def percentile(self, q: float) -> int:
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common()) or "none"
        return (
            f"data: {self.examples_in} examples in, {self.examples_out} kept (dropped: {dropped}); "
            f"tokens p50/p90/p99/max {self.percentile(0.5)}/{self.percentile(0.9)}/{self.percentile(0.99)}/"
            f"{max(self.lengths, default=0)}; supervised {self.supervised_tokens / max(self.total_tokens, 1):.1%}; "
            f"truncated {self.truncated / max(self.examples_out, 1):.1%}"
        )


def resolve_format(recipe: Recipe, columns: list[str]) -> str:
    return formats.detect_format(columns) if recipe.dataset_format == "auto" else recipe.dataset_format


def conversations(recipe: Recipe, rows: Rows) -> tuple[Any, Counter]:
    """One ``messages`` list per example; bad rows stop the run (``on_bad_rows: error``) or are counted."""
    columns = rows.dataset.column_names
    dataset_format = resolve_format(recipe, columns)
    formats.check_columns(columns, dataset_format, rows.sources[0])
    if dataset_format == "oasst":
        converted = _map(
            rows.dataset,
            formats.oasst_conversations,
            batched=True,
            batch_size=None,  # a tree's messages must be seen together
            with_indices=True,
            remove_columns=columns,
            fn_kwargs={"flat": oasst.layout(columns) == "flat", "all_paths": recipe.oasst_all_paths,
                       "languages": recipe.oasst_languages},
            desc="Selecting OpenAssistant conversations",
        )
        where = lambda row: f"{rows.sources[0]} conversation {row}"  # noqa: E731
    else:
        converted = _map(
            rows.dataset,
            formats.to_conversations,
            batched=True,
            with_indices=True,
            remove_columns=columns,
            fn_kwargs={"dataset_format": dataset_format},
            desc=f"Formatting ({dataset_format})",
        )
        where = rows.origin
    problems = Counter(p for p in converted["problem"] if p)
    if problems and recipe.on_bad_rows == "error":
        first = _filter(converted, _is_bad, input_columns="problem").select([0])[0]
        raise RecipeError(
            f"{where(first['row'])}: {first['problem']} ({sum(problems.values())} bad row(s) in all; "
            "fix them or set on_bad_rows: skip to drop and count them)"
        )
    good = _filter(converted, _is_good, input_columns="problem", desc="Dropping bad rows") if problems else converted
    return good.remove_columns("problem"), problems


def tokenize_batch(batch: dict[str, list], tokenizer: Any, ids: Any, max_length: int) -> dict[str, list]:
    input_ids, labels = encode_conversations(tokenizer, batch["messages"], ids)
    return {
        "input_ids": [x[:max_length] for x in input_ids],  # keep the start: the prompt gives the response meaning
        "labels": [y[:max_length] for y in labels],
        "full_length": [len(x) for x in input_ids],
    }


def _render_problem(example: dict, tokenizer: Any) -> str:
    from .preview import render_example

    return render_example(example, tokenizer, color=False)


def _require_examples(dataset: Any, recipe: Recipe) -> None:
    if len(dataset) == 0:
        raise RecipeError(f"no trainable examples left in {recipe.dataset_name} after preprocessing")


def tokenize_and_audit(recipe: Recipe, tokenizer: Any, convs: Any, report: DataReport) -> Any:
    _require_examples(convs, recipe)
    ids = special_ids(tokenizer)
    tokenized = _map(
        convs,
        tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "ids": ids, "max_length": recipe.max_length},
        desc="Tokenizing and masking",
    )
    kept = _filter(tokenized, _has_supervision, input_columns="labels", desc="Dropping fully cut examples")
    if len(kept) < len(tokenized):
        report.dropped["response cut by max_length"] += len(tokenized) - len(kept)
    _require_examples(kept, recipe)
    audited = _map(
        kept,
        audit_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "ids": ids, "max_length": recipe.max_length},
        desc="Auditing labels",
    )
    failures = [i for i, problem in enumerate(audited["audit"]) if problem]
    if failures:
        example = audited[failures[0]]
        raise RecipeError(
            f"label audit failed on {len(failures)} example(s); first (#{failures[0]}): {example['audit']}\n"
            + _render_problem(example, tokenizer)
        )
    return audited.remove_columns("audit")


def build_sft_dataset(recipe: Recipe, tokenizer: Any, rows: Rows | None = None) -> tuple[Any, DataReport]:
    """The training examples: ``messages``, ``input_ids``, ``labels`` (``-100`` where masked), ``full_length``."""
    rows = load_rows(recipe) if rows is None else rows
    convs, problems = conversations(recipe, rows)
    report = DataReport(examples_in=len(convs) + sum(problems.values()), dropped=Counter(problems))
    dataset = tokenize_and_audit(recipe, tokenizer, convs, report)
    report.examples_out = len(dataset)
    report.lengths = [len(x) for x in dataset["input_ids"]]
    report.total_tokens = sum(report.lengths)
    report.supervised_tokens = sum(sum(1 for y in labels if y != IGNORE_INDEX) for labels in dataset["labels"])
    report.truncated = sum(1 for n in dataset["full_length"] if n > recipe.max_length)
    return dataset, report


def train_and_eval(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    """The training set and the held-out set (``dataset_test_split`` or ``eval_split_size``), if any."""
    train, report = build_sft_dataset(recipe, tokenizer)
    if recipe.dataset_test_split:
        evaluation, _ = build_sft_dataset(recipe, tokenizer, load_rows(recipe, split=recipe.dataset_test_split))
        return train, evaluation, report
    if recipe.eval_split_size:
        size = recipe.eval_split_size
        split = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=recipe.seed)
        return split["train"], split["test"], report
    return train, None, report
