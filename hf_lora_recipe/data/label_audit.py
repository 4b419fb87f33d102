"""Pre-flight label audit: every example is checked against the masking invariants before training.

A violation aborts the run and shows the example the way ``preview`` does. These are the failures that
otherwise train silently: an unmasked prompt (the model echoes instructions), an unsupervised EOS (it
never stops), a doubled BOS, a response shifted by one token at the prompt boundary. The checks are
written independently of :mod:`template`, from the token ids and the conversation alone.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, SpecialIds, decode_texts


def supervised_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of supervised positions, as [start, end) pairs."""
    spans, start = [], None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def _positions(values: list[int], value: int) -> list[int]:
    found, start = [], 0
    try:
        while True:
            start = values.index(value, start)
            found.append(start)
            start += 1
    except ValueError:
        return found


def structural_problem(
    input_ids: list[int],
    labels: list[int],
    spans: list[tuple[int, int]],
    num_responses: int,
    ids: SpecialIds,
    truncated: bool,
) -> str | None:
    """Invariants that need no decoding; None when they hold."""
    if len(input_ids) != len(labels):
        return "input_ids and labels differ in length"
    if not spans:
        return "no supervised token"
    if any(labels[start:end] != input_ids[start:end] for start, end in spans):
        return "a label differs from its input token"
    control = set(ids.control_ids)
    for i in range(1, len(input_ids)):
        if input_ids[i] == input_ids[i - 1] and input_ids[i] in control:
            name = "BOS" if input_ids[i] == ids.bos_id else f"special token {input_ids[i]}"
            return f"{name} at position {i} is doubled"
    for start, end in spans:
        if any(token in control for token in input_ids[start : end - 1]):
            return "a template token inside an assistant turn is supervised"
    if ids.bos_id is not None:
        if input_ids[0] != ids.bos_id:
            return "the sequence does not start with BOS"
        for i in _positions(input_ids, ids.bos_id):
            if labels[i] != IGNORE_INDEX or (i > 0 and input_ids[i - 1] != ids.eos_id):
                return f"BOS at position {i} is doubled, misplaced or supervised"
    if ids.layout == "llama2" and ids.bos_id != ids.eos_id:  # other templates also close prompt turns with it
        for i in _positions(input_ids, ids.eos_id):
            if labels[i] == IGNORE_INDEX:
                return f"EOS at position {i} is not supervised"
    if len(spans) > num_responses:
        return f"{len(spans)} supervised spans for {num_responses} assistant turns: a prompt token is supervised"
    if not truncated and len(spans) != num_responses:
        return f"{num_responses - len(spans)} assistant turn(s) are not supervised"
    for turn, (start, end) in enumerate(spans):
        if not (truncated and end == len(input_ids)) and input_ids[end - 1] != ids.eos_id:
            return f"assistant turn {turn} does not end with a supervised end-of-turn token (EOS)"
    return None


def _flat(sequences: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=total)


def structural_problems(
    input_ids: list[list[int]],
    labels: list[list[int]],
    num_responses: list[int],
    truncated: list[bool],
    ids: SpecialIds,
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """:func:`structural_problem` for a batch, and each sound example's supervised spans.

    The invariants are screened on the whole batch at once (one flat array of positions); an example the
    screen flags gets :func:`structural_problem`'s verdict and message, so both always agree on the wording
    and tests/test_label_audit.py checks they agree on the verdict.
    """
    count = len(input_ids)
    problems = [""] * count
    spans: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=count)
    aligned = lengths == np.fromiter(map(len, labels), dtype=np.int64, count=count)
    rows = np.flatnonzero(aligned)
    lengths = lengths[rows]
    total = int(lengths.sum())
    if len(rows) == count:
        x, y = _flat(input_ids, total), _flat(labels, total)
    else:
        x, y = _flat([input_ids[i] for i in rows], total), _flat([labels[i] for i in rows], total)
    example = np.repeat(np.arange(len(rows)), lengths)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    nonempty = lengths > 0
    first = np.zeros(total, dtype=bool)
    first[starts[nonempty]] = True
    last = np.zeros(total, dtype=bool)
    last[ends[nonempty] - 1] = True

    supervised = y != IGNORE_INDEX
    supervised_before = np.concatenate(([False], supervised[:-1])) & ~first
    supervised_after = np.concatenate((supervised[1:], [False])) & ~last
    span_start = supervised & ~supervised_before
    span_last = supervised & ~supervised_after
    previous = np.concatenate(([-1], x[:-1]))
    control = np.isin(x, np.asarray(ids.control_ids, dtype=np.int64))
    cut = np.asarray(truncated, dtype=bool)[rows]

    wrong = supervised & (y != x)
    wrong |= control & (x == previous) & ~first  # a doubled template token
    wrong |= control & supervised & supervised_after  # a template token inside an assistant turn
    wrong |= span_last & (x != ids.eos_id) & ~(last & cut[example])  # a turn not closed by end-of-turn
    if ids.bos_id is not None:
        wrong |= (x == ids.bos_id) & (supervised | (~first & (previous != ids.eos_id)))
        wrong[starts[nonempty]] |= x[starts[nonempty]] != ids.bos_id
    if ids.layout == "llama2" and ids.bos_id != ids.eos_id:
        wrong |= (x == ids.eos_id) & ~supervised
    span_count = np.bincount(example[span_start], minlength=len(rows))
    responses = np.asarray(num_responses, dtype=np.int64)[rows]
    flagged = np.bincount(example[wrong], minlength=len(rows)) > 0
    flagged |= (span_count == 0) | (span_count > responses) | (~cut & (span_count != responses))

    span_rows = example[span_start].tolist()
    span_begins = (np.flatnonzero(span_start) - starts[example[span_start]]).tolist()
    span_ends = (np.flatnonzero(span_last) + 1 - starts[example[span_last]]).tolist()
    row_index = rows.tolist()
    for row, begin, end in zip(span_rows, span_begins, span_ends):
        spans[row_index[row]].append((begin, end))
    suspects = rows[flagged].tolist() + np.flatnonzero(~aligned).tolist()
    for i in suspects:
        spans[i] = supervised_spans(labels[i])
        problems[i] = structural_problem(input_ids[i], labels[i], spans[i], num_responses[i], ids, truncated[i]) or ""
    return problems, spans


def audit_examples(
    input_ids: list[list[int]],
    labels: list[list[int]],
    messages: list[list[dict]],
    truncated: list[bool],
    tokenizer: Any,
    ids: SpecialIds,
) -> list[str]:
    """One problem string per example ("" when it holds); responses are decoded in one batched call."""
    responses = [[m["content"] for m in conversation if m["role"] == "assistant"] for conversation in messages]
    problems, spans = structural_problems(input_ids, labels, [len(r) for r in responses], truncated, ids)
    to_decode: list[list[int]] = []
    expected: list[tuple[int, int, str]] = []  # (example, turn, response text)
    for index, (x, cut) in enumerate(zip(input_ids, truncated)):
        if problems[index]:
            continue
        for turn, ((start, end), response) in enumerate(zip(spans[index], responses[index])):
            if not (cut and end == len(x)):  # a turn cut by max_length keeps only its start
                to_decode.append(x[start : end - 1])
                expected.append((index, turn, response.strip()))
    decoded = decode_texts(tokenizer, to_decode) if to_decode else []
    for text, (index, turn, response) in zip(decoded, expected):
        if not problems[index] and text.strip() != response:
            problems[index] = (
                f"assistant turn {turn}: supervised tokens decode to {text.strip()[:60]!r}, not the response"
            )
    return problems


TRAINED, MASKED, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_example(example: dict, tokenizer: Any, color: bool) -> str:
    """Decode runs of masked / trained tokens; special tokens are shown, so BOS and EOS are visible."""
    pieces: list[str] = []
    input_ids, labels = example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            trained = labels[start] != IGNORE_INDEX
            if color:
                pieces.append(f"{TRAINED if trained else MASKED}{text}{RESET}")
            else:
                pieces.append(f"«{text}»" if trained else text)
            start = i
    supervised = sum(1 for y in labels if y != IGNORE_INDEX)
    cut = " (truncated)" if example.get("full_length", 0) > len(input_ids) else ""
    return "".join(pieces) + f"\n  [{len(input_ids)} tokens, {supervised} trained{cut}]"
