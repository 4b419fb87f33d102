"""Pre-flight label audit: every example is checked against the masking invariants before training.

A violation aborts the run and shows the example the way ``preview`` does. These are the failures that
otherwise train silently: an unmasked prompt (the model echoes instructions), an unsupervised EOS (it
never stops), a doubled BOS, a response shifted by one token at the prompt boundary.
"""

from __future__ import annotations

from typing import Any

from .template import IGNORE_INDEX, SpecialIds


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


def example_problem(
    input_ids: list[int], labels: list[int], messages: list[dict], tokenizer: Any, ids: SpecialIds, truncated: bool
) -> str | None:
    """The first invariant this example breaks, or None."""
    if len(input_ids) != len(labels):
        return "input_ids and labels differ in length"
    if any(label not in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels)):
        return "a label differs from its input token"
    spans = supervised_spans(labels)
    if not spans:
        return "no supervised token"
    if ids.bos_id is not None:
        if input_ids[0] != ids.bos_id:
            return "the sequence does not start with BOS"
        for i, token in enumerate(input_ids):
            if token == ids.bos_id and (labels[i] != IGNORE_INDEX or (i > 0 and input_ids[i - 1] != ids.eos_id)):
                return f"BOS at position {i} is doubled, misplaced or supervised"
    if ids.bos_id != ids.eos_id:
        masked_eos = [i for i, (t, y) in enumerate(zip(input_ids, labels)) if t == ids.eos_id and y == IGNORE_INDEX]
        if masked_eos:
            return f"EOS at position {masked_eos[0]} is not supervised"
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    if len(spans) > len(responses):
        return f"{len(spans)} supervised spans for {len(responses)} assistant turns: a prompt token is supervised"
    for turn, ((start, end), response) in enumerate(zip(spans, responses)):
        cut = truncated and end == len(input_ids)
        if cut:
            continue  # the last turn lost its tail to max_length; what remains is still the response's start
        if input_ids[end - 1] != ids.eos_id:
            return f"assistant turn {turn} does not end with a supervised EOS"
        decoded = tokenizer.decode(input_ids[start : end - 1], skip_special_tokens=False).strip()
        if decoded != response.strip():
            return f"assistant turn {turn}: supervised tokens decode to {decoded[:60]!r}, not the response"
    if not truncated and len(spans) != len(responses):
        return f"{len(responses) - len(spans)} assistant turn(s) are not supervised"
    return None


def audit_batch(batch: dict[str, list], tokenizer: Any, ids: SpecialIds, max_length: int) -> dict[str, list]:
    return {
        "audit": [
            example_problem(x, y, m, tokenizer, ids, truncated=n > max_length) or ""
            for x, y, m, n in zip(batch["input_ids"], batch["labels"], batch["messages"], batch["full_length"])
        ]
    }
