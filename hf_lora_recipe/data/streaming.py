"""``streaming: true``: rows are read, formatted, tokenized and audited as training consumes them.

For data too large for the disk (a Hub dataset read with ``datasets``' streaming) or for a local file one does
not want copied into an Arrow cache (JSON Lines and parquet are read row by row; .json and .csv files whole).
The same per-row steps as the map-style path run on each batch of the stream (:func:`data.prepare_batch`), so a
streamed example is token for token the one ``preview`` shows; a bad row or a failed audit stops the run naming
the file and line, and ``on_bad_rows: skip`` counts what it drops. The first rows are checked before the model
loads. Nothing is cached, nothing has a length: ``max_steps`` says how long to train, and the stream repeats
(in the same order) if it runs out first.

Resuming: Trainer skips the batches the checkpoint already trained by reading them again from the start of the
stream (its ``skip_first_batches``). The stream's order is a function of the seed alone (no shuffle, or a seeded
shuffle buffer), so the resumed run continues at exactly the next example, provided the source is unchanged;
the data digest, carried across the resume (see ``trainer.RecipeTrainer``), shows it. The price is re-reading
(and re-tokenizing) the examples already trained.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.data import row_formats as formats
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.llama2 import SpecialIds, special_ids


ORIGIN = "_origin"  # where a streamed row came from ("f.jsonl line 7"): rows have no index to look it up by
SHUFFLE_BUFFER = 10_000  # rows held by the seeded shuffle buffer (train_sampling_strategy random)
HEAD_ROWS = 256  # rows checked (formatted, tokenized, audited) before the model loads
BATCH_ROWS = 256  # rows per batched step of the stream


@dataclass
class Tally:
    """What the stream has done so far: rows read, examples kept, dropped by reason, tokens."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    supervised: int = 0
    truncated: int = 0
    lengths: list[int] = field(default_factory=list)

    def line(self) -> str:
        dropped = ", ".join(f"{n} {why}" for why, n in self.dropped.most_common()) or "none"
        return (
            f"stream: {self.rows} rows read, {self.kept} examples kept (dropped: {dropped}); {self.tokens:,} "
            f"tokens, {self.supervised / max(self.tokens, 1):.1%} supervised"
        )


# ---------------------------------------------------------------------------------------------- rows


def _jsonl_rows(path: Path, name: str) -> Iterator[dict]:
    from hf_lora_recipe.data.readers import _bad_json, _json_type

    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):  # the last line, still being appended: stop at the one before
                    log.warn(
                        f"{name} line {number} is not complete yet (no newline, not valid JSON): read up to line {number - 1}"
                    )
                    return
                raise _bad_json(name, error, number, len(line) - len(line.lstrip()) + error.colno) from None
            except UnicodeDecodeError:
                raise RecipeError(f"{name} line {number}: not UTF-8 text; re-save the file as UTF-8") from None
            if type(row) is not dict:
                raise RecipeError(
                    f"{name} line {number}: a JSON {_json_type(row)}, not an object; JSON Lines hold "
                    "one row object per line"
                )
            yield {**row, ORIGIN: f"{name} line {number}"}


def _file_rows(path: Path, name: str) -> Iterator[dict]:
    from hf_lora_recipe.data.readers import _csv_records, read_csv, read_json

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(path, name)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield {**row, ORIGIN: f"{name} row {index}"}
                index += 1
    elif suffix == ".csv":
        rows = read_csv(path, name)
        # each record's first line, found in one pass (a quoted value may span lines), the header's dropped
        lines = [line for line, _ in _csv_records(path.read_text(encoding="utf-8-sig"))][1:]
        for row, line in zip(rows, lines):
            yield {**row, ORIGIN: f"{name} line {line}"}
    else:
        rows, kind = read_json(path, name)
        for index, row in enumerate(rows):
            where = f"element {index} (0-based)" if kind == "list" else f"row {index}"
            yield {**row, ORIGIN: f"{name} {where}"}


def _local_rows(files: list[str], names: list[str]) -> Iterator[dict]:
    for file, name in zip(files, names):
        yield from _file_rows(Path(file), name)


def raw_stream(recipe: Recipe) -> Any:
    """The rows of ``dataset_name`` as an ``IterableDataset``, each with its origin."""
    from datasets import IterableDataset, load_dataset

    from hf_lora_recipe.data.readers import _display_name, split_files

    files = split_files(recipe)
    if files is not None:
        path = Path(recipe.dataset_name).expanduser()
        # a shard per file (datasets' rule for list arguments), read in order; shuffled with the seed when random
        return IterableDataset.from_generator(
            _local_rows,
            gen_kwargs={"files": [str(f) for f in files], "names": [_display_name(path, f) for f in files]},
        )
    name, split = recipe.dataset_name, recipe.dataset_train_split
    try:
        stream = load_dataset(
            name, recipe.dataset_config, split=split, revision=recipe.dataset_revision, streaming=True
        )
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise RecipeError(
            f"dataset_name {name}: cannot stream it ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    return stream.map(lambda _, index: {ORIGIN: f"{name}[{split}] row {index}"}, with_indices=True)


# ---------------------------------------------------------------------------------------------- examples


def _prepare_stream_batch(
    batch: dict[str, list], dataset_format: str, tokenizer: Any, ids: SpecialIds, recipe: Recipe, tally: Tally
) -> dict[str, list]:
    """One batch of rows -> the kept examples (input_ids, labels, counts); bad rows and audit failures are
    errors naming the row, or (bad rows, with on_bad_rows skip) counted and dropped."""
    from hf_lora_recipe.data.label_audit import render_example
    from hf_lora_recipe.data.pipeline import prepare_batch

    origins = batch.pop(ORIGIN)
    out = prepare_batch(
        batch,
        list(range(len(origins))),
        dataset_format,
        tokenizer,
        ids,
        recipe.max_length,
        recipe.completion_only_loss,
    )
    tally.rows += len(origins)
    keep = []
    for i, origin in enumerate(origins):
        if out["problem"][i]:
            if recipe.on_bad_rows == "error":
                raise RecipeError(
                    f"{origin}: {out['problem'][i]} (fix the row or set on_bad_rows: skip to drop and count bad rows)"
                )
            tally.dropped[out["problem"][i]] += 1
        elif out["audit"][i]:
            example = {key: out[key][i] for key in ("input_ids", "labels")}
            raise RecipeError(
                f"label audit failed ({origin}): {out['audit'][i]}\n" + render_example(example, tokenizer, color=False)
            )
        elif out["num_supervised"][i] == 0:
            tally.dropped["response cut by max_length"] += 1
        else:
            keep.append(i)
            length = len(out["input_ids"][i])
            tally.kept += 1
            tally.tokens += length
            tally.supervised += out["num_supervised"][i]
            tally.truncated += out["full_length"][i] > recipe.max_length
            if len(tally.lengths) < 100_000:  # enough for the percentiles; a stream has no end
                tally.lengths.append(length)
    return {key: [out[key][i] for i in keep] for key in ("input_ids", "labels", "num_supervised", "full_length")}


def _columns(raw: Any, recipe: Recipe) -> list[str]:
    try:
        first = next(iter(raw))
    except StopIteration:
        raise RecipeError(f"dataset_name {recipe.dataset_name}: the stream holds no rows") from None
    return [column for column in first if column != ORIGIN]


def examples(recipe: Recipe, tokenizer: Any, tally: Tally, repeat: bool = True) -> Any:
    """The training examples of a streamed ``dataset_name``, in the order the trainer will take them (repeating
    from the start, in the same order, if it runs out before ``max_steps``)."""
    raw = raw_stream(recipe)
    columns = _columns(raw, recipe)
    dataset_format = formats.detect_format(columns) if recipe.dataset_format == "auto" else recipe.dataset_format
    if dataset_format == "oasst":
        raise RecipeError(
            "streaming: OpenAssistant trees must be read whole to pick their conversations; convert them "
            "first (dataset_format messages) or set streaming false"
        )
    formats.check_columns(columns, dataset_format, recipe.dataset_name)
    if recipe.train_sampling_strategy == "random":
        raw = raw.shuffle(seed=recipe.seed, buffer_size=SHUFFLE_BUFFER)
    stream = raw.map(
        _prepare_stream_batch,
        batched=True,
        batch_size=BATCH_ROWS,
        remove_columns=[*columns, ORIGIN],
        fn_kwargs={
            "dataset_format": dataset_format,
            "tokenizer": tokenizer,
            "ids": special_ids(tokenizer),
            "recipe": recipe,
            "tally": tally,
        },
    )
    return stream.repeat(None) if repeat else stream


def build_stream(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any]:
    """(the stream the trainer reads, a report of its first rows, which were checked before anything loads)."""
    import numpy as np

    from hf_lora_recipe.data.pipeline import DataReport

    head = Tally()
    for _ in examples(
        recipe, tokenizer, head, repeat=False
    ):  # formats, tokenizes, audits: a bad row stops the run now
        if head.rows >= HEAD_ROWS:
            break
    if head.kept == 0:
        raise RecipeError(f"no trainable examples in the first {head.rows} rows of {recipe.dataset_name}")
    report = DataReport(
        examples_in=head.rows,
        dropped=head.dropped,
        examples_out=head.kept,
        total_tokens=head.tokens,
        supervised_tokens=head.supervised,
        truncated=head.truncated,
        lengths=np.asarray(head.lengths, dtype=np.int64),
        streamed=Tally(),
    )
    return examples(recipe, tokenizer, report.streamed), report


def stream_and_eval(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any | None, Any]:
    """``data.train_and_eval`` for a stream: the training stream, the held-out split (read whole), the report."""
    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.data.readers import load_rows

    train, report = build_stream(recipe, tokenizer)
    evaluation = None
    if recipe.dataset_test_split:
        evaluation, _ = build_sft_dataset(recipe, tokenizer, load_rows(recipe, split=recipe.dataset_test_split))
    return train, evaluation, report
