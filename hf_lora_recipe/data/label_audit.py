"""Pre-flight label audit: every example is checked against the masking invariants before training.

A violation aborts the run and shows the example the way ``preview`` does. These are the failures that
otherwise train silently: an unmasked prompt (the model echoes instructions), an unsupervised EOS (it
never stops), a doubled BOS, a response shifted by one token at the prompt boundary. The checks are
written independently of :mod:`template`, from the token ids and the conversation alone.
"""

from __future__ import annotations

from typing import Any

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


def audit_examples(
    input_ids: list[list[int]],
    labels: list[list[int]],
    messages: list[list[dict]],
    truncated: list[bool],
    tokenizer: Any,
    ids: SpecialIds,
) -> list[str]:
    """One problem string per example ("" when it holds); responses are decoded in one batched call."""
    problems: list[str] = []
    to_decode: list[list[int]] = []
    expected: list[tuple[int, int, str]] = []  # (example, turn, response text)
    for index, (x, y, conversation, cut) in enumerate(zip(input_ids, labels, messages, truncated)):
        responses = [m["content"] for m in conversation if m["role"] == "assistant"]
        spans = supervised_spans(y)
        problems.append(structural_problem(x, y, spans, len(responses), ids, cut) or "")
        if problems[-1]:
            continue
        for turn, ((start, end), response) in enumerate(zip(spans, responses)):
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
