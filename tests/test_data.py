"""The data path on the real samples and both real tokenizers: rendering, masking, selection, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_lora_recipe.data import oasst
from hf_lora_recipe.data import row_formats as formats
from hf_lora_recipe.data.label_audit import audit_examples, supervised_spans
from hf_lora_recipe.data.pipeline import build_sft_dataset, conversation_source
from hf_lora_recipe.data.readers import load_rows
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, special_ids

from .conftest import shared_asset


def _recipe(dataset: Path | str, **overrides) -> Recipe:
    return Recipe(dataset_name=str(dataset), **overrides)


def conversations(recipe: Recipe, rows):
    """Just the conversations a recipe selects (no tokenizer), to compare data layouts."""
    source, dataset_format, _ = conversation_source(recipe, rows)
    if dataset_format == "conversations":
        return source
    return source.map(
        formats.to_conversations,
        fn_kwargs={"dataset_format": dataset_format},
        batched=True,
        with_indices=True,
        remove_columns=source.column_names,
    )


def _check_invariants(example: dict, tokenizer, max_length: int) -> None:
    """The masking invariants, checked here independently of the audit's code."""
    ids = special_ids(tokenizer)
    input_ids, labels, messages = example["input_ids"], example["labels"], example["messages"]
    assert len(input_ids) == len(labels) <= max_length
    responses = [m["content"] for m in messages if m["role"] == "assistant"]
    users = [m for m in messages if m["role"] == "user"]
    spans = supervised_spans(labels)
    truncated = example["full_length"] > max_length
    assert spans and len(spans) <= len(responses)
    if ids.bos_id is not None:
        assert input_ids[0] == ids.bos_id and labels[0] == IGNORE_INDEX
        assert input_ids.count(ids.bos_id) <= len(users)
        assert all(not (a == b == ids.bos_id) for a, b in zip(input_ids, input_ids[1:]))  # never doubled
    else:
        assert tokenizer.bos_token_id is None or input_ids[0] != ids.eos_id
    for turn, (start, end) in enumerate(spans):
        text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
        if truncated and end == len(input_ids):
            assert end == max_length
            continue
        assert input_ids[end - 1] == ids.eos_id  # each turn's last supervised token is EOS
        assert text == tokenizer.decode(input_ids[start : end - 1]) + tokenizer.eos_token or text.endswith(
            tokenizer.eos_token
        )
        assert tokenizer.decode(input_ids[start : end - 1]).strip() == responses[turn].strip()
    # nothing else is supervised: everything outside the spans decodes to prompt text only
    masked = [t for t, y in zip(input_ids, labels) if y == IGNORE_INDEX]
    assert ids.eos_id not in masked or ids.bos_id == ids.eos_id


DATA_FILES = ["alpaca_en_demo.json", "oasst2_trees_sample.jsonl", "oasst2_messages_sample.jsonl"]


@pytest.mark.parametrize("max_length", [2048, 64])
@pytest.mark.parametrize("data_file", DATA_FILES)
def test_invariants_hold_on_every_example(data_file, max_length, tokenizer):
    path = shared_asset(f"data/{data_file}")
    dataset, report = build_sft_dataset(_recipe(path, dataset_format="auto", max_length=max_length), tokenizer)
    assert len(dataset) == report.examples_out > 0
    for example in dataset:
        _check_invariants(example, tokenizer, max_length)
    if max_length == 2048 and data_file.startswith("alpaca"):
        assert report.examples_in == report.examples_out == 999  # nothing dropped at a large max_length


def test_oasst_trees_and_flat_give_the_same_conversations():
    for all_paths in (False, True):
        recipe = _recipe("x", dataset_format="oasst", oasst_all_paths=all_paths)
        trees = conversations(recipe, load_rows(_recipe(shared_asset("data/oasst2_trees_sample.jsonl"))))
        flat = conversations(recipe, load_rows(_recipe(shared_asset("data/oasst2_messages_sample.jsonl"))))
        assert trees["messages"] == flat["messages"] and len(trees) > 50


def test_oasst_language_filter():
    rows = load_rows(_recipe(shared_asset("data/oasst2_trees_sample.jsonl")))
    every = conversations(_recipe("x", dataset_format="oasst"), rows)
    english = conversations(_recipe("x", dataset_format="oasst", oasst_languages=["en"]), rows)
    assert 0 < len(english) < len(every)


def _message(mid, role, text, rank=None, date="2023-01-01", **extra):
    return {
        "message_id": mid,
        "role": role,
        "text": text,
        "rank": rank,
        "created_date": date,
        "lang": "en",
        "deleted": False,
        "review_result": True,
        "replies": [],
        **extra,
    }


def test_oasst_rule_on_hand_built_trees():
    root = _message("r", "prompter", "Q")
    best = _message("a1", "assistant", "best", rank=0)
    second = _message("a2", "assistant", "second", rank=1)
    unranked = _message("a3", "assistant", "unranked", rank=None, date="2022-01-01")
    deleted = _message("a4", "assistant", "deleted", rank=-1, deleted=True)
    rejected = _message("a5", "assistant", "rejected", rank=-2, review_result=False)
    follow_up = _message("p2", "prompter", "follow-up")  # a prompter reply with no answer: trimmed away
    best["replies"] = [follow_up]
    root["replies"] = [unranked, second, deleted, rejected, best]
    assert oasst.tree_conversations(root) == [
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "best"}]
    ]
    # ties by earliest created_date; null rank after ranked ones
    early, late = (
        _message("e", "assistant", "early", rank=0, date="2023-01-01"),
        _message("l", "assistant", "late", rank=0, date="2023-02-01"),
    )
    root["replies"] = [late, unranked, early]
    assert oasst.tree_conversations(root)[0][1]["content"] == "early"
    root["replies"] = [unranked]
    assert oasst.tree_conversations(root)[0][1]["content"] == "unranked"
    # a multi-turn path follows the best child at every turn
    answer2 = _message("a6", "assistant", "second answer", rank=0)
    follow_up["replies"] = [answer2]
    root["replies"] = [best]
    assert [m["content"] for m in oasst.tree_conversations(root)[0]] == ["Q", "best", "follow-up", "second answer"]
    # no reply, or only deleted replies: nothing
    lonely = _message("x", "prompter", "hello?")
    assert oasst.tree_conversations(lonely) == []
    lonely["replies"] = [_message("d", "assistant", "gone", deleted=True)]
    assert oasst.tree_conversations(lonely) == []
    # a deleted root yields nothing
    assert oasst.tree_conversations({**root, "deleted": True}) == []
    # all paths: every root-to-leaf path, each ending at its last assistant message
    root["replies"] = [best, second]
    paths = oasst.tree_conversations(root, all_paths=True)
    assert [[m["content"] for m in p] for p in paths] == [["Q", "best", "follow-up", "second answer"], ["Q", "second"]]


BAD_ROWS = [
    ({"instruction": "Say hi", "input": "", "output": None}, "field 'output' is missing or null"),
    ({"instruction": "Say hi", "input": ""}, "field 'output' is missing or null"),
    ({"instruction": "Say hi", "input": "", "output": "   "}, "field 'output' is empty"),
    ({"instruction": 7, "input": "", "output": "hi"}, "field 'instruction' is int, not a string"),
]


@pytest.mark.parametrize("bad_row, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_bad_alpaca_rows(bad_row, reason, tmp_path, llama2_tokenizer):
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([good, good, bad_row, good]))
    with pytest.raises(RecipeError, match=rf"rows.json element 2 \(0-based\): {reason}"):
        build_sft_dataset(_recipe(path), llama2_tokenizer)
    dataset, report = build_sft_dataset(_recipe(path, on_bad_rows="skip"), llama2_tokenizer)
    assert len(dataset) == 3 and report.dropped == {reason: 1} and report.examples_in == 4


BAD_CONVERSATIONS = [
    (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        "roles don't alternate: message 1 is 'user', expected 'assistant'",
    ),
    (
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}],
        "field 'messages\\[1\\].content' is empty",
    ),
    ([{"role": "user", "content": "a"}], "conversation doesn't end with an assistant turn"),
    ([{"role": "assistant", "content": "a"}], "roles don't alternate: message 0 is 'assistant', expected 'user'"),
]


@pytest.mark.parametrize("bad, reason", BAD_CONVERSATIONS, ids=range(len(BAD_CONVERSATIONS)))
def test_bad_conversations(bad, reason, tmp_path, llama2_tokenizer):
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in [good, bad, good]))
    with pytest.raises(RecipeError, match=rf"chats.jsonl line 2: {reason}"):
        build_sft_dataset(_recipe(path, dataset_format="messages"), llama2_tokenizer)
    dataset, report = build_sft_dataset(_recipe(path, dataset_format="messages", on_bad_rows="skip"), llama2_tokenizer)
    assert len(dataset) == 2 and sum(report.dropped.values()) == 1


def test_empty_dataset_after_filtering_is_an_error(tmp_path, llama2_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "x", "output": ""}]))
    with pytest.raises(RecipeError, match="no trainable examples"):
        build_sft_dataset(_recipe(path, on_bad_rows="skip"), llama2_tokenizer)


def test_example_whose_response_is_cut_is_dropped_and_counted(tmp_path, llama2_tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(
        json.dumps([{"instruction": "word " * 80, "output": "ok"}, {"instruction": "short", "output": "ok"}])
    )
    dataset, report = build_sft_dataset(_recipe(path, max_length=32), llama2_tokenizer)
    assert len(dataset) == 1 and report.dropped == {"response cut by max_length": 1}


def test_auto_format_detection_and_ambiguity(tmp_path, llama2_tokenizer):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}))
    dataset, _ = build_sft_dataset(_recipe(path, dataset_format="auto"), llama2_tokenizer)
    assert dataset[0]["messages"][1]["content"] == "4"
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "a", "completion": "b", "instruction": "c", "output": "d"}))
    with pytest.raises(RecipeError, match="found alpaca and prompt_completion"):
        build_sft_dataset(_recipe(both, dataset_format="auto"), llama2_tokenizer)


def test_local_directory_csv_and_parquet(tmp_path, llama2_tokenizer):
    import pandas as pd

    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame([{"instruction": "a", "input": "", "output": "b"}] * 2).to_parquet(folder / "part1.parquet")
    pd.DataFrame([{"instruction": "c", "input": "x", "output": "d"}] * 3).to_parquet(folder / "part2.parquet")
    dataset, report = build_sft_dataset(_recipe(folder), llama2_tokenizer)
    assert report.examples_in == 5 and len(dataset) == 5
    csv = tmp_path / "rows.csv"
    pd.DataFrame([{"instruction": "a", "input": "", "output": "b"}]).to_csv(csv, index=False)
    assert len(build_sft_dataset(_recipe(csv), llama2_tokenizer)[0]) == 1


def test_multi_turn_every_assistant_turn_and_eos_supervised(tokenizer, tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "u1 [/INST] fake"},
        {"role": "assistant", "content": "a1 [INST] typed"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    path.write_text(json.dumps({"messages": chat}))
    dataset, _ = build_sft_dataset(_recipe(path, dataset_format="messages"), tokenizer)
    example = dataset[0]
    _check_invariants(example, tokenizer, 512)
    spans = supervised_spans(example["labels"])
    assert len(spans) == 2
    decoded = [tokenizer.decode(example["input_ids"][s : e - 1]).strip() for s, e in spans]
    assert decoded == ["a1 [INST] typed", "a2"]  # a marker typed in a response is supervised with it


def test_audit_catches_each_silent_failure(llama2_tokenizer):
    ids = special_ids(llama2_tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    from hf_lora_recipe.templates.llama2 import encode_conversations

    [input_ids], [labels] = encode_conversations(llama2_tokenizer, [messages], ids)
    check = lambda x, y: audit_examples([x], [y], [messages], [False], llama2_tokenizer, ids)[0] or None  # noqa: E731
    assert check(input_ids, labels) is None
    first = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
    unmasked = list(input_ids)  # prompt supervised
    assert "supervised" in check(input_ids, unmasked)
    no_eos = labels[:-1] + [IGNORE_INDEX]
    assert "EOS" in check(input_ids, no_eos)
    shifted = labels[:first] + [IGNORE_INDEX] + labels[first + 1 :]  # first response token masked
    assert "decode" in check(input_ids, shifted)
    doubled = [ids.bos_id] + input_ids
    assert "BOS" in check(doubled, [IGNORE_INDEX] + labels)
    assert "no supervised token" in check(input_ids, [IGNORE_INDEX] * len(labels))
