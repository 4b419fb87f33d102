"""Hostile data, end to end through ``preview``: every failure is one line naming the file and the row as the
user sees it (JSONL/CSV line, JSON element, parquet row), nothing is re-typed, skipped rows are exactly the bad
ones, and local folders split into train/validation/test without ever mixing them.

Each case writes its file(s) under ``tmp_path``, runs ``hf-lora-recipe preview`` in-process with the real
Llama-2 tokenizer (loaded once), and checks the exit code, the message and, where it succeeds, exactly which
rows were kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hf_lora_recipe.commands.preview import main as preview_main
from hf_lora_recipe.data.readers import load_rows
from hf_lora_recipe.recipe.schema import Recipe

from .conftest import shared_asset


GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def rows(n: int, **bad: dict) -> list[dict]:
    """``n`` good alpaca rows answering ``a0``..``a{n-1}``; ``bad={"5": {...}}`` overrides fields of row 5."""
    out = [{**GOOD, "output": f"a{i}"} for i in range(n)]
    for index, fields in bad.items():
        out[int(index)] = {**out[int(index)], **fields}
    return out


def jsonl(records: list, blank_before: dict[int, int] | None = None) -> str:
    """JSON Lines; ``blank_before={i: k}`` puts ``k`` blank lines before record ``i``."""
    lines = []
    for i, record in enumerate(records):
        lines += [""] * (blank_before or {}).get(i, 0)
        lines.append(record if isinstance(record, str) else json.dumps(record))
    return "\n".join(lines) + "\n"


def parquet(records: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pandas as pd

        pd.DataFrame(records).to_parquet(path)

    return write


def message(mid, parent, role, text, **extra) -> dict:
    return {
        "message_id": mid,
        "parent_id": parent,
        "role": role,
        "text": text,
        "rank": 0,
        "lang": "en",
        "deleted": False,
        "review_result": True,
        **extra,
    }


OASST_FLAT = [
    message("r1", None, "prompter", "Q1"),
    message("a1", "r1", "assistant", "A1"),
    message("o1", "gone", "assistant", "orphan"),
    message("o2", "o1", "prompter", "orphan's reply"),  # missing parent
    message("c1", "c2", "prompter", "cycle 1"),
    message("c2", "c1", "assistant", "cycle 2"),  # a parent cycle
    message("r2", None, "prompter", "Q2"),
    message("d1", "r2", "assistant", "deleted", deleted=True),
    message("d2", "d1", "prompter", "under deleted"),
    message("d3", "d2", "assistant", "under deleted too"),
    message("a2", "r2", "assistant", "A2", rank=1),
]


@dataclass
class Case:
    id: str
    files: dict[str, Any]  # relative path -> text, bytes, or a writer(path)
    args: list[str]  # recipe overrides; {tmp} is the case's folder; --dataset_name defaults to the first file
    rc: int
    phrase: str = ""  # the error line (rc 2) or the report (rc 0) must contain it
    kept: list[str] | None = None  # rc 0: exactly these responses, in order
    check: Callable[[Path], None] | None = field(default=None, repr=False)


def _test_split_is(expected: list[str]) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        recipe = Recipe(dataset_name=str(tmp / "data"), dataset_test_split="test")
        assert load_rows(recipe, split="test").dataset["output"] == expected

    return check


CASES = [
    # --- one non-string value: named at its own row, skip drops exactly that row, no re-typing
    Case(
        "int-in-json-list",
        {"rows.json": json.dumps(rows(8, **{"5": {"output": 3}}))},
        [],
        2,
        "rows.json element 5 (0-based): field 'output' is int, not a string",
    ),
    Case(
        "int-in-json-list-skip",
        {"rows.json": json.dumps(rows(8, **{"5": {"output": 3}, "2": {"output": "42"}}))},
        ["--on_bad_rows", "skip"],
        0,
        "1 field 'output' is int, not a string",
        kept=["a0", "a1", "42", "a3", "a4", "a6", "a7"],
    ),
    Case(
        "dict-in-jsonl",
        {"rows.jsonl": jsonl(rows(8, **{"5": {"output": {"text": "hi"}}}))},
        [],
        2,
        "rows.jsonl line 6: field 'output' is dict, not a string",
    ),
    Case(
        "dict-in-jsonl-skip",
        {"rows.jsonl": jsonl(rows(8, **{"5": {"output": {"text": "hi"}}}))},
        ["--on_bad_rows", "skip"],
        0,
        "1 field 'output' is dict, not a string",
        kept=["a0", "a1", "a2", "a3", "a4", "a6", "a7"],
    ),
    Case(
        "int-first-row-skip",
        {"rows.jsonl": jsonl(rows(4, **{"0": {"instruction": 7}}))},
        ["--on_bad_rows", "skip"],
        0,
        "1 field 'instruction' is int, not a string",
        kept=["a1", "a2", "a3"],
    ),
    Case(
        "jsonl-line-counts-blank-lines",
        {"rows.jsonl": jsonl(rows(4, **{"3": {"output": None}}), {1: 2, 3: 1})},
        [],
        2,
        "rows.jsonl line 7: field 'output' is missing or null",
    ),
    Case(
        "bool-and-list-skip",
        {"rows.jsonl": jsonl(rows(5, **{"1": {"output": True}, "3": {"input": ["x"]}}))},
        ["--on_bad_rows", "skip"],
        0,
        "1 field 'input' is list, not a string",
        kept=["a0", "a2", "a4"],
    ),
    Case(
        "message-content-int",
        {
            "chats.jsonl": jsonl(
                [
                    {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "ok"}]},
                    {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": 5}]},
                ]
            )
        },
        ["--dataset_format", "messages"],
        2,
        "chats.jsonl line 2: field 'messages[1].content' is int, not a string",
    ),
    Case(
        "csv-line-after-multiline-cell",
        {"rows.csv": 'instruction,input,output\n"two\nlines",,a0\nx,,a1\ny,,\n'},
        [],
        2,
        "rows.csv line 5: field 'output' is missing or null",
    ),
    Case(
        "csv-too-many-values",
        {"rows.csv": "instruction,input,output\nx,,a0\nx,y,z,w\n"},
        [],
        2,
        "rows.csv line 3: 4 values but the header names 3 columns",
    ),
    Case(
        "parquet-row",
        {"rows.parquet": parquet(rows(4, **{"2": {"output": None}}))},
        [],
        2,
        "rows.parquet row 2: field 'output' is missing or null",
    ),
    # --- files that can't be read: one line naming the file and the place
    Case(
        "corrupt-json",
        {"bad.json": '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]'},
        [],
        2,
        "bad.json line 2 column 22: not valid JSON (Expecting ',' delimiter)",
    ),
    Case(
        "corrupt-jsonl",
        {"bad.jsonl": jsonl([GOOD, GOOD, '{"instruction": "x", "output": }'], {2: 1})},
        [],
        2,
        "bad.jsonl line 4 column 32: not valid JSON",
    ),
    Case(
        "truncated-jsonl", {"bad.jsonl": jsonl([GOOD]) + '{"instruction": "x", "out'}, [], 2, "bad.jsonl line 2 column"
    ),
    Case(
        "garbage-after-list",
        {"bad.json": json.dumps(rows(2)) + "\nxyz"},
        [],
        2,
        "bad.json line 2 column 1: not valid JSON (Extra data)",
    ),
    Case(
        "json-list-named-jsonl",
        {"list.jsonl": json.dumps(rows(2), indent=1)},
        [],
        2,
        "list.jsonl line 1 column 2: not valid JSON (Expecting value); fix the file there; this looks like a JSON list",
    ),
    Case(
        "json-lines-named-json",
        {"lines.json": jsonl(rows(3, **{"2": {"output": ""}}))},
        [],
        2,
        "lines.json line 3: field 'output' is empty",
    ),
    Case("empty-file", {"empty.json": ""}, [], 2, "empty.json is empty"),
    Case("blank-jsonl", {"blank.jsonl": "\n  \n\n"}, [], 2, "blank.jsonl is empty"),
    Case("empty-list", {"none.json": "[]"}, [], 2, "none.json is an empty JSON list"),
    Case(
        "object-not-list",
        {"obj.json": json.dumps({"data": rows(2)}, indent=2)},
        [],
        2,
        "obj.json holds a JSON object (keys data), not a list of rows",
    ),
    Case("scalar", {"n.json": "42"}, [], 2, "n.json holds a JSON number, not a list of rows"),
    Case(
        "list-of-strings", {"s.json": '["a", "b"]'}, [], 2, "s.json element 0 (0-based): a JSON string, not an object"
    ),
    Case(
        "jsonl-line-is-a-list", {"l.jsonl": jsonl([GOOD, [1, 2]])}, [], 2, "l.jsonl line 2: a JSON list, not an object"
    ),
    Case(
        "latin-1",
        {"latin.json": '[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1")},
        [],
        2,
        "latin.json: not UTF-8 text: byte 0xe9 at byte offset 21 (line 1)",
    ),
    Case(
        "utf-16",
        {"wide.jsonl": jsonl([GOOD]).encode("utf-16")},
        [],
        2,
        "wide.jsonl: not UTF-8 text (it looks like UTF-16)",
    ),
    Case("missing-file", {}, ["--dataset_name", "{tmp}/nope.jsonl"], 2, "nope.jsonl: no such file or folder"),
    Case("missing-relative-dir", {}, ["--dataset_name", "./data/"], 2, "dataset_name ./data/: no such file or folder"),
    Case(
        "no-data-files",
        {"data/notes.txt": "hello"},
        ["--dataset_name", "{tmp}/data"],
        2,
        "no data files in this folder or its sub-folders",
    ),
    Case("empty-folder", {"data/.keep": ""}, ["--dataset_name", "{tmp}/data"], 2, "it is empty"),
    Case("unsupported-file", {"rows.txt": "hello"}, [], 2, "rows.txt: not a data file type this recipe reads"),
    # --- folders and splits: train/ and test/ never merge; an absent split is an error naming the ones found
    Case(
        "split-folders",
        {"data/train/a.jsonl": jsonl(rows(2)), "data/test/b.jsonl": jsonl(rows(5)[2:])},
        ["--dataset_name", "{tmp}/data", "--dataset_test_split", "test"],
        0,
        "2 examples in",
        kept=["a0", "a1"],
        check=_test_split_is(["a2", "a3", "a4"]),
    ),
    Case(
        "split-file-names",
        {"data/my_train.jsonl": jsonl(rows(2)), "data/test-1.jsonl": jsonl(rows(5)[2:])},
        ["--dataset_name", "{tmp}/data"],
        0,
        "2 examples in",
        kept=["a0", "a1"],
        check=_test_split_is(["a2", "a3", "a4"]),
    ),
    Case(
        "test-split-absent",
        {"data/train/a.jsonl": jsonl(rows(2)), "data/test/b.jsonl": jsonl(rows(2))},
        ["--dataset_name", "{tmp}/data", "--dataset_test_split", "validation"],
        2,
        "dataset_test_split: 'validation' is not a split of",
    ),
    Case(
        "test-split-of-a-file",
        {"rows.json": json.dumps(rows(2))},
        ["--dataset_test_split", "test"],
        2,
        "it has train (a single file is the train split only)",
    ),
    Case(
        "dev-folder-as-validation",
        {"data/train/a.jsonl": jsonl(rows(2)), "data/dev/b.jsonl": jsonl(rows(3))},
        ["--dataset_name", "{tmp}/data", "--dataset_train_split", "validation"],
        0,
        "3 examples in",
        kept=["a0", "a1", "a2"],
    ),
    Case(
        "flat-folder-is-train",
        {"data/a.jsonl": jsonl(rows(2)), "data/b.json": json.dumps(rows(3)[2:])},
        ["--dataset_name", "{tmp}/data"],
        0,
        "3 examples in",
        kept=["a0", "a1", "a2"],
    ),
    Case(
        "file-in-no-split",
        {"data/train.jsonl": jsonl(rows(2)), "data/extra.jsonl": jsonl(rows(2))},
        ["--dataset_name", "{tmp}/data"],
        2,
        "extra.jsonl belongs to no split",
    ),
    Case(
        "bad-row-in-a-folder",
        {"data/train/a.jsonl": jsonl(rows(2)), "data/train/b.jsonl": jsonl(rows(3, **{"1": {"output": 1}}))},
        ["--dataset_name", "{tmp}/data"],
        2,
        "data/train/b.jsonl line 2: field 'output' is int",
    ),
    # --- OpenAssistant: messages no conversation can reach are counted, not lost silently
    Case(
        "oasst-dropped-counted",
        {"msgs.jsonl": jsonl(OASST_FLAT)},
        ["--dataset_format", "oasst"],
        0,
        "2 messages whose parent_id is not in the data (with their replies), 2 messages in (or under) a parent_id "
        "cycle",
        kept=["A1", "A2"],
    ),
    Case(
        "oasst-bad-text",
        {"msgs.jsonl": jsonl([*OASST_FLAT[:2], message("b", "r1", "assistant", 7)])},
        ["--dataset_format", "oasst"],
        2,
        "msgs.jsonl line 3: field 'text' is int, not a string",
    ),
    Case(
        "hub-id-offline",
        {},
        ["--dataset_name", "someone/no-such-dataset"],
        2,
        "dataset_name someone/no-such-dataset: not a local file or folder, and the Hub dataset could not be loaded",
    ),
    # --- ~ is the home folder
    Case(
        "tilde",
        {"home/rows.json": json.dumps(rows(2))},
        ["--dataset_name", "~/rows.json"],
        0,
        "2 examples in",
        kept=["a0", "a1"],
    ),
]


@pytest.fixture
def isolated(tmp_path, monkeypatch, llama2_tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(
        "hf_lora_recipe.templates.tokenizer.tokenizer_for", lambda recipe: llama2_tokenizer
    )  # load it once
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _preview(tmp: Path, case: Case, *extra: str) -> int:
    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    if "--dataset_name" not in args:
        args += ["--dataset_name", str(tmp / next(iter(case.files)))]
    return preview_main(["--model_name_or_path", str(shared_asset("tokenizers/llama2")), *args, *extra])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_data(case: Case, isolated, capsys):
    for relative, content in case.files.items():
        path = isolated / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    rc = _preview(isolated, case, "--num_examples", "0")
    out, err = capsys.readouterr()
    assert rc == case.rc, err[-2000:]
    assert "Traceback" not in err
    if case.rc:
        last = err.strip().splitlines()[-1]
        assert last.startswith("hf-lora-recipe: error:") and case.phrase in last, last
        return
    assert case.phrase in out, out
    if case.kept is not None:
        assert _preview(isolated, case, "--num_examples", "100", "--json") == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["messages"][-1]["content"] for r in records] == case.kept
    if case.check:
        case.check(isolated)


def test_a_changed_file_is_read_again(isolated, capsys):
    """The Arrow cache of a local file is keyed by its size and mtime: an edit is never hidden by it."""
    path = isolated / "rows.jsonl"
    path.write_text(jsonl(rows(3)))
    case = Case("edit", {"rows.jsonl": ""}, ["--on_bad_rows", "skip"], 0)
    assert _preview(isolated, case, "--num_examples", "0") == 0
    assert "3 examples in, 3 kept" in capsys.readouterr().out
    path.write_text(jsonl(rows(4, **{"1": {"output": 2}})))
    assert _preview(isolated, case, "--num_examples", "0") == 0
    assert "4 examples in, 3 kept (dropped: 1 field 'output' is int, not a string)" in capsys.readouterr().out
