"""Rows -> conversations -> token ids and labels, audited, exactly as the trainer consumes them.

One batched ``datasets`` map formats, tokenizes, masks, truncates and audits each row (OpenAssistant trees
are first turned into conversations by a map over the whole table). Results are cached on disk under a
key made of the input's fingerprint, this package's source, the tokenizer and the settings, so a second
run with the same data reads the cache instead of re-tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_lora_recipe.data import oasst
from hf_lora_recipe.data import row_formats as formats
from hf_lora_recipe.data.label_audit import audit_examples, render_example
from hf_lora_recipe.data.readers import Rows, load_rows
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, SpecialIds, encode_conversations, special_ids


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(
        Path(__file__).parents[1].rglob("*.py")
    ):  # all of the package: no cached map outlives a change to its code
        digest.update(path.read_bytes())
    return digest.hexdigest()


CODE_VERSION = _source_hash()


def tokenizer_digest(tokenizer: Any) -> str:
    """A stable identity for a tokenizer: datasets' own hashing pickles it, which takes seconds per map."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return Hasher.hash(tokenizer)
    state = [
        backend.to_str(),
        type(tokenizer).__name__,
        tokenizer.chat_template,
        getattr(tokenizer, "legacy", None),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    ]
    return hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()


def _fingerprint(dataset: Any, step: Callable, key: dict) -> str:
    # datasets keys its cache on a mapped function by module and name, not by its code, so our source is
    # part of the key: after an upgrade of this package no stale formatting or masking is reused.
    from hf_lora_recipe.upstream.datasets import fingerprint

    material = json.dumps([fingerprint(dataset), step.__qualname__, CODE_VERSION, key], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


PARALLEL_MIN_ROWS = 20_000  # below this, starting worker processes costs more than it saves


def _map(dataset: Any, step: Callable, key: dict, fn_kwargs: dict, parallel: bool = True, **options: Any) -> Any:
    # In one process the fast tokenizer uses every core, but formatting, auditing and Arrow writing are
    # Python: worker processes give those the other cores too, each tokenizing on one thread (the tokenizer
    # turns its threads off in a forked child). Figures: benchmarks/RESULTS.md, make bench.
    workers = min(os.cpu_count() or 1, 8) if parallel and len(dataset) >= PARALLEL_MIN_ROWS else None
    return dataset.map(
        step, fn_kwargs=fn_kwargs, new_fingerprint=_fingerprint(dataset, step, key), num_proc=workers, **options
    )


@dataclass
class DataReport:
    """What preprocessing did, printed before training so nothing is dropped silently.

    ``dropped`` counts examples (bad rows, responses cut by ``max_length``) and, under the ``oasst.UNUSED``
    reasons, OpenAssistant messages and trees that no conversation reaches (shown apart in the summary).
    """

    examples_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples_out: int = 0
    total_tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # a mixture (``datasets:``): each source's own report, how they were mixed, and what each became in the mix
    sources: list[tuple[str, DataReport]] = field(default_factory=list)
    mixing: str = ""
    mixture: list[dict[str, Any]] = field(default_factory=list)
    # streaming: the report covers the rows checked before loading; this tally counts the stream as it trains
    streamed: Any = None

    @property
    def mean_length(self) -> float:
        return self.total_tokens / max(self.examples_out, 1)

    def percentile(self, q: float) -> int:
        return int(np.percentile(self.lengths, 100 * q, method="lower")) if len(self.lengths) else 0

    def summary(self) -> str:
        if self.sources:
            return "\n".join(
                [
                    *(
                        report.summary().replace("data:", f"data: source {label}:", 1)
                        for label, report in self.sources
                    ),
                    self.mixture_line(),
                ]
            )
        counts = self.dropped.most_common()
        head = (
            f"data (streaming: the first {self.examples_in} rows, checked before loading; the rest are checked "
            f"as they stream):"
            if self.streamed is not None
            else "data:"
        )
        dropped = ", ".join(f"{n} {why}" for why, n in counts if why not in oasst.UNUSED) or "none"
        unused = ", ".join(f"{n} {why.removeprefix('oasst ')}" for why, n in counts if why in oasst.UNUSED)
        dropped += f"; OpenAssistant data no conversation uses: {unused}" if unused else ""
        return (
            f"{head} {self.examples_in} examples in, {self.examples_out} kept (dropped: {dropped}); "
            f"tokens p50/p90/p99/max {self.percentile(0.5)}/{self.percentile(0.9)}/{self.percentile(0.99)}/"
            f"{self.lengths.max(initial=0)}; supervised {self.supervised_tokens / max(self.total_tokens, 1):.1%}; "
            f"truncated {self.truncated / max(self.examples_out, 1):.1%}"
        )

    def mixture_line(self) -> str:
        parts = []
        for share in self.mixture:
            asked = f" (asked {share['asked_share']:.1%})" if share["asked_share"] is not None else ""
            parts.append(
                f"{share['source']} {share['examples_used']} = {share['share_of_examples']:.1%} of examples{asked}, "
                f"{share['share_of_supervised_tokens']:.1%} of supervised tokens"
            )
        return (
            f"mixture: {self.examples_out} examples, {self.mixing}; "
            + "; ".join(parts)
            + f"; tokens p50/p90/max {self.percentile(0.5)}/{self.percentile(0.9)}/{self.lengths.max(initial=0)}"
        )


def prepare_batch(
    batch: dict[str, list],
    indices: list[int],
    dataset_format: str,
    tokenizer: Any,
    ids: SpecialIds,
    max_length: int,
    completion_only: bool = True,
) -> dict[str, list]:
    """Rows -> conversation, tokens, labels, audit result and counts, for one batch."""
    if dataset_format == "conversations":  # already converted (OpenAssistant trees)
        converted = {"messages": batch["messages"], "problem": batch["problem"], "row": batch["row"]}
    else:
        converted = formats.to_conversations(batch, indices, dataset_format)
    good = [i for i, problem in enumerate(converted["problem"]) if not problem]
    input_ids, labels = encode_conversations(tokenizer, [converted["messages"][i] for i in good], ids)
    if not completion_only:
        labels = [list(x) for x in input_ids]
    size = len(indices)
    out: dict[str, list] = {
        **converted,
        "input_ids": [[] for _ in range(size)],
        "labels": [[] for _ in range(size)],
        "full_length": [0] * size,
        "num_supervised": [0] * size,
        "audit": [""] * size,
    }
    kept_for_audit = []
    for i, x, y in zip(good, input_ids, labels):
        out["full_length"][i] = len(x)
        x, y = x[:max_length], y[:max_length]  # keep the start: the prompt gives the response its meaning
        out["input_ids"][i], out["labels"][i] = x, y
        out["num_supervised"][i] = len(y) - y.count(IGNORE_INDEX)
        if out["num_supervised"][i] and completion_only:  # the audit checks the masking policy
            kept_for_audit.append(i)
    audit = audit_examples(
        [out["input_ids"][i] for i in kept_for_audit],
        [out["labels"][i] for i in kept_for_audit],
        [out["messages"][i] for i in kept_for_audit],
        [out["full_length"][i] > max_length for i in kept_for_audit],
        tokenizer,
        ids,
    )
    for i, problem in zip(kept_for_audit, audit):
        out["audit"][i] = problem
    return out


def _keep(problems: list[str], num_supervised: list[int]) -> list[bool]:
    return [not p and n > 0 for p, n in zip(problems, num_supervised)]


def _column(dataset: Any, name: str) -> np.ndarray:
    return dataset.data.column(name).to_numpy(zero_copy_only=False)


def _first_with(dataset: Any, values: np.ndarray) -> dict:
    """The first example whose string column ``values`` is non-empty."""
    return dataset[int(np.flatnonzero(values != "")[0])]


def conversation_source(recipe: Recipe, rows: Rows) -> tuple[Any, str, Callable[[int], str]]:
    """(rows to format, their format, row -> where it came from); OpenAssistant trees become conversations first."""
    return _conversation_source(recipe, rows)[:3]


def _conversation_source(recipe: Recipe, rows: Rows) -> tuple[Any, str, Callable[[int], str], Counter]:
    """:func:`conversation_source`, and the OpenAssistant messages the selection never reaches, by reason."""
    columns = rows.dataset.column_names
    dataset_format = formats.detect_format(columns) if recipe.dataset_format == "auto" else recipe.dataset_format
    formats.check_columns(columns, dataset_format, rows.sources[0])
    if dataset_format != "oasst":
        return rows.dataset, dataset_format, rows.origin, Counter()
    flat = oasst.layout(columns) == "flat"
    options = {"flat": flat, "all_paths": recipe.oasst_all_paths, "languages": recipe.oasst_languages}
    source = _map(
        rows.dataset,
        formats.oasst_conversations,
        options,
        options,
        parallel=False,
        batched=True,
        batch_size=None,
        with_indices=True,
        remove_columns=columns,
        desc="Selecting OpenAssistant conversations",
    )  # a tree's messages must be seen together
    counting = {"flat": flat, "languages": recipe.oasst_languages}
    counts = _map(
        rows.dataset,
        formats.oasst_dropped,
        counting,
        counting,
        parallel=False,
        batched=True,
        batch_size=None,
        remove_columns=columns,
        desc="Counting unused OpenAssistant messages",
    )
    dropped = Counter(dict(zip(counts["reason"], counts["count"]))) if len(counts) else Counter()
    return source, "conversations", rows.origin, dropped


def prepare(recipe: Recipe, tokenizer: Any, rows: Rows) -> tuple[Any, DataReport]:
    source, dataset_format, where, unused = _conversation_source(recipe, rows)
    ids = special_ids(tokenizer)
    options = {
        "dataset_format": dataset_format,
        "ids": ids,
        "max_length": recipe.max_length,
        "completion_only": recipe.completion_only_loss,
    }
    key = {**options, "tokenizer": tokenizer_digest(tokenizer)}
    prepared = _map(
        source,
        prepare_batch,
        key,
        {**options, "tokenizer": tokenizer},
        batched=True,
        with_indices=True,
        remove_columns=source.column_names,
        desc="Formatting, tokenizing, auditing",
    )

    report = DataReport()
    problem_column, audit_column = _column(prepared, "problem"), _column(prepared, "audit")
    problems = Counter(p for p in problem_column if p)
    report.examples_in = len(prepared)
    if problems and recipe.on_bad_rows == "error":
        first = _first_with(prepared, problem_column)
        raise RecipeError(
            f"{where(first['row'])}: {first['problem']} ({sum(problems.values())} bad row(s) in all; "
            "fix them or set on_bad_rows: skip to drop and count them)"
        )
    report.dropped.update(problems)
    report.dropped.update(unused)  # OpenAssistant messages no conversation reaches, counted, never an error
    cut = int(((problem_column == "") & (_column(prepared, "num_supervised") == 0)).sum())
    if cut:
        report.dropped["response cut by max_length"] = cut
    if (audit_column != "").any():
        failures = int((audit_column != "").sum())
        example = _first_with(prepared, audit_column)
        raise RecipeError(
            f"label audit failed on {failures} example(s); first ({where(example['row'])}): {example['audit']}\n"
            + render_example(example, tokenizer, color=False)
        )
    dataset = prepared
    if problems or cut:
        dataset = prepared.filter(
            _keep,
            input_columns=["problem", "num_supervised"],
            batched=True,
            new_fingerprint=_fingerprint(prepared, _keep, {}),
            desc="Dropping",
        )
    if len(dataset) == 0:
        raise RecipeError(f"no trainable examples left in {recipe.dataset_name} after preprocessing")
    dataset = dataset.remove_columns(["problem", "audit", "row"])
    _count_examples(report, dataset, recipe.max_length)
    return dataset, report


def _count_examples(report: DataReport, dataset: Any, max_length: int) -> None:
    """The report's counts of what ``dataset`` holds: examples, their (truncated) lengths, tokens, supervision."""
    full_length = _column(dataset, "full_length")
    report.examples_out = len(dataset)
    report.lengths = np.minimum(full_length, max_length)
    report.total_tokens = int(report.lengths.sum())
    report.supervised_tokens = int(_column(dataset, "num_supervised").sum())
    report.truncated = int((full_length > max_length).sum())


def build_sft_dataset(recipe: Recipe, tokenizer: Any, rows: Rows | None = None) -> tuple[Any, DataReport]:
    """The training examples: ``messages``, ``input_ids``, ``labels`` (``-100`` where masked), and counts; the
    recipe's ``datasets`` mixed into one (see :mod:`hf_lora_recipe.data.mixture`) when it names several."""
    if rows is None and recipe.datasets:
        return build_mixture(recipe, tokenizer)
    return prepare(recipe, tokenizer, load_rows(recipe) if rows is None else rows)


def build_mixture(recipe: Recipe, tokenizer: Any) -> tuple[Any, DataReport]:
    """Each source prepared on its own (its format, bad rows, audit), then mixed; the report shows both."""
    from hf_lora_recipe.data import mixture

    prepared = [prepare(single, tokenizer, load_rows(single)) for single in mixture.source_recipes(recipe)]
    mixed = mixture.mix(recipe, [dataset for dataset, _ in prepared])
    reports = [report for _, report in prepared]
    report = DataReport(
        examples_in=sum(r.examples_in for r in reports),
        dropped=sum((r.dropped for r in reports), Counter()),
        sources=[(mixture.source_label(s), r) for s, r in zip(recipe.datasets, reports)],
        mixing=mixture.how(recipe),
        mixture=mixture.shares(recipe, mixed, reports),
    )
    _count_examples(report, mixed, recipe.max_length)
    return mixed, report


def train_and_eval(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None, DataReport]:
    """The training set and the held-out set (``dataset_test_split`` or ``eval_split_size``), if any (a stream:
    :func:`hf_lora_recipe.data.streaming.stream_and_eval`)."""
    train, report = build_sft_dataset(recipe, tokenizer)
    if recipe.dataset_test_split:  # a single dataset only (a mixture holds out with eval_split_size)
        evaluation, _ = build_sft_dataset(recipe, tokenizer, load_rows(recipe, split=recipe.dataset_test_split))
        return train, evaluation, report
    if recipe.eval_split_size:
        held_out = held_out_rows(recipe.eval_split_size, len(train))
        split = train.train_test_split(test_size=held_out, seed=recipe.seed)
        return split["train"], split["test"], report
    return train, None, report


def held_out_rows(eval_split_size: float, rows: int) -> int:
    """The rows ``eval_split_size`` holds out of ``rows`` (a share rounds up, as ``datasets`` does); both sides
    must keep at least one row."""
    held_out = int(eval_split_size) if eval_split_size >= 1 else math.ceil(eval_split_size * rows)
    if not 1 <= held_out < rows:
        raise RecipeError(
            f"eval_split_size {eval_split_size:g} holds out {held_out} of the {rows} training examples; "
            f"choose a count in [1, {rows - 1}] or a share that leaves rows on both sides"
        )
    return held_out


TRAINING_EXAMPLES = "training_examples.safetensors"  # the run's example identities, beside its adapter


def example_hashes(dataset: Any) -> np.ndarray:
    """One identity per example: the first 63 bits of the sha256 of its token ids, as the pipeline built them
    (the same row, template and tokenizer give the same ids, so eval can tell a row training saw)."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()[:8], "little") >> 1
            for ids in dataset["input_ids"]
        ],
        dtype=np.int64,
    )


def save_example_hashes(dataset: Any, directory: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"hashes": np.unique(example_hashes(dataset))}, str(directory / TRAINING_EXAMPLES))


def trained_examples(dataset: Any, directory: Path) -> int | None:
    """How many examples of ``dataset`` the run in ``directory`` trained on (None: it recorded no identities)."""
    from safetensors.numpy import load_file

    path = directory / TRAINING_EXAMPLES
    if not path.is_file():
        return None
    trained = load_file(str(path))["hashes"]
    return int(np.isin(example_hashes(dataset), trained).sum())
