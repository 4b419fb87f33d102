"""The label audit's batched screen gives the per-example checks' verdict on every example, sound or broken."""

from __future__ import annotations

import random

import pytest

from hf_lora_recipe.data.label_audit import structural_problem, structural_problems, supervised_spans
from hf_lora_recipe.data.readers import load_rows
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, SpecialIds, encode_conversations, special_ids

from .test_data import _recipe, conversations


BOS, EOS, HEADER = 1, 2, 3
LAYOUTS = {
    "llama2": SpecialIds(bos_id=BOS, eos_id=EOS, layout="llama2", control_ids=(BOS, EOS)),
    "template with BOS": SpecialIds(bos_id=BOS, eos_id=EOS, layout="template", control_ids=(BOS, EOS, HEADER)),
    "template without BOS": SpecialIds(bos_id=None, eos_id=EOS, layout="template", control_ids=(EOS, HEADER)),
}


def _conversation(rng: random.Random, ids: SpecialIds) -> tuple[list[int], list[int], int]:
    """A well-formed example in the layout: (input_ids, labels, assistant turns)."""
    input_ids: list[int] = []
    labels: list[int] = []
    turns = rng.randint(1, 3)
    for _ in range(turns):
        prompt = ([ids.bos_id] if ids.bos_id is not None else []) + [
            rng.randint(10, 40) for _ in range(rng.randint(0, 5))
        ]
        if ids.layout == "template":
            prompt += [HEADER]
        reply = [rng.randint(10, 40) for _ in range(rng.randint(0, 5))] + [ids.eos_id]
        input_ids += prompt + reply
        labels += [IGNORE_INDEX] * len(prompt) + reply
    return input_ids, labels, turns


def _mutate(rng: random.Random, x: list[int], y: list[int], ids: SpecialIds) -> tuple[list[int], list[int], bool]:
    """One of the ways an example goes wrong (or a truncation, which may be fine)."""
    x, y = list(x), list(y)
    if not x or len(x) != len(y):
        return x, y, False
    i = rng.randrange(len(x))
    kind = rng.randrange(11)
    if kind == 0:
        y[i] = IGNORE_INDEX  # a supervised token masked
    elif kind == 1:
        y[i] = x[i]  # a prompt token supervised
    elif kind == 2:
        y[i] = x[i] + 1 if y[i] != IGNORE_INDEX else y[i]  # a label that is not its input token
    elif kind == 3:
        x.insert(i, x[i])
        y.insert(i, y[i])  # a doubled token (BOS, EOS, header or text)
    elif kind == 4:
        token = rng.choice([t for t in (BOS, EOS, HEADER) if t in ids.control_ids])
        x.insert(i, token)
        y.insert(i, rng.choice([IGNORE_INDEX, token]))  # a stray control token, masked or supervised
    elif kind == 5:
        del x[i], y[i]  # a token lost (the EOS, the BOS, a boundary)
    elif kind == 6:
        return x[:i], y[:i], True  # cut by max_length
    elif kind == 7:
        return x[:i], y[:i], False  # cut but not marked as cut
    elif kind == 8:
        y = y[:-1]  # labels shorter than the input
    elif kind == 9:
        return [], [], rng.random() < 0.5
    else:
        x[i] = ids.eos_id if rng.random() < 0.5 else (ids.bos_id if ids.bos_id is not None else HEADER)
    return x, y, False


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_screen_agrees_with_the_per_example_checks(layout):
    ids = LAYOUTS[layout]
    rng = random.Random(layout)
    examples = []
    for _ in range(3000):
        x, y, turns = _conversation(rng, ids)
        cut = False
        for _ in range(rng.choice([0, 0, 1, 2])):
            x, y, cut = _mutate(rng, x, y, ids)
        examples.append((x, y, turns, cut))
    batch = [list(column) for column in zip(*examples)]
    problems, spans = structural_problems(*batch, ids)

    expected = [structural_problem(x, y, supervised_spans(y), turns, ids, cut) or "" for x, y, turns, cut in examples]
    assert problems == expected
    broken = sum(1 for p in expected if p)
    assert 1000 < broken < 2500, "the mutations should break some examples and leave others sound"
    assert len({p.split(" at position")[0] for p in expected if p}) >= 10, "every check should be exercised"
    for (x, y, _, _), problem, found in zip(examples, problems, spans):
        if not problem:
            assert found == supervised_spans(y)


def test_real_rows_pass_the_screen_with_the_spans_of_the_labels(llama2_tokenizer, alpaca_path):
    ids = special_ids(llama2_tokenizer)
    rows = conversations(_recipe(alpaca_path), load_rows(_recipe(alpaca_path)))["messages"][:200]
    input_ids, labels = encode_conversations(llama2_tokenizer, rows, ids)
    problems, spans = structural_problems(input_ids, labels, [1] * len(rows), [False] * len(rows), ids)
    assert problems == [""] * len(rows)
    assert spans == [supervised_spans(y) for y in labels]


def test_empty_batches_and_empty_examples():
    ids = LAYOUTS["llama2"]
    assert structural_problems([], [], [], [], ids) == ([], [])
    problems, spans = structural_problems([[], []], [[], []], [1, 1], [False, True], ids)
    assert problems == ["no supervised token"] * 2 and spans == [[], []]
