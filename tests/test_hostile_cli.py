"""Hostile input to the commands' own flags and recipe files: one `hf-lora-recipe: error:` line, exit 2, nothing loaded.

Each row: (id, command, argv, exit code, a phrase the message must contain). The data, train-time and
publish/merge tables are tests/test_hostile_data.py, test_hostile_train.py and test_hostile_publish.py.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

from .conftest import CLI, REPO_ROOT, shared_asset


LLAMA_8B = "model_configs/llama-3-8b"


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


ROWS = [
    (
        "yaml-duplicate-key",
        "train",
        lambda t: ["--config", _recipe(t, "lora_r: 8\nlora_r: 16\n")],
        2,
        "line 2: key 'lora_r' is given twice",
    ),
    ("yaml-syntax-error", "train", lambda t: ["--config", _recipe(t, "lora_r: [8\n")], 2, "invalid YAML"),
    ("yaml-not-a-mapping", "preview", lambda t: ["--config", _recipe(t, "- lora_r\n")], 2, "a recipe is a mapping"),
    ("yaml-not-utf8", "plan", lambda t: ["--config", _binary(t)], 2, "not UTF-8 text"),
    ("recipe-missing", "train", lambda t: ["--config", str(t / "nope.yaml")], 2, "recipe not found"),
    ("unknown-key", "train", lambda t: ["--lora_rank", "8"], 2, "did you mean 'lora_r'"),
    # every numeric key has declared bounds, checked at load: the key, the value and the range in one line
    ("negative-seed", "train", lambda t: ["--seed", "-1"], 2, "seed must be in [0, 4294967295]; got -1"),
    ("beta-of-one", "plan", lambda t: ["--adam_beta2", "1.0"], 2, "adam_beta2 must be in [0, 1); got 1.0"),
    ("zero-logging-steps", "preview", lambda t: ["--logging_steps", "0"], 2, "logging_steps must be positive; got 0"),
    ("negative-warmup", "train", lambda t: ["--warmup_steps", "-5"], 2, "warmup_steps must be >= 0; got -5.0"),
    ("zero-learning-rate", "train", lambda t: ["--learning_rate", "0"], 2, "learning_rate must be positive; got 0.0"),
    (
        "trains-nothing",
        "train",
        lambda t: ["--max_steps", "-1", "--num_train_epochs", "0"],
        2,
        "the recipe trains nothing (max_steps -1, num_train_epochs 0)",
    ),
    (
        "eval-split-fractional-count",
        "train",
        lambda t: ["--eval_split_size", "2.5"],
        2,
        "eval_split_size 2.5 is neither",
    ),
    ("zero-max-steps", "train", lambda t: ["--max_steps", "0"], 2, "the recipe trains nothing (max_steps 0"),
    # every float key refuses NaN and infinities, from the flag or the YAML (NaN passes every comparison)
    ("nan-flag", "train", lambda t: ["--learning_rate", "nan"], 2, "learning_rate: 'nan' is not a finite number"),
    ("inf-flag", "plan", lambda t: ["--lora_dropout=-inf"], 2, "lora_dropout: '-inf' is not a finite number"),
    (
        "inf-yaml",
        "preview",
        lambda t: ["--config", _recipe(t, "num_train_epochs: .inf\n")],
        2,
        "num_train_epochs: inf is not",
    ),
    (
        "nan-int-yaml",
        "train",
        lambda t: ["--config", _recipe(t, "lora_r: .nan\n")],
        2,
        "lora_r: cannot read nan as int",
    ),
    (
        "nan-mixture-weight",
        "train",
        lambda t: ["--config", _recipe(t, "datasets:\n  - {name: a.jsonl, weight: .nan}\n")],
        2,
        "weight must be a number > 0; got nan",
    ),
    ("typed-accumulation", "train", lambda t: ["--gradient_accumulation_steps", "8"], 2, "derived, never typed"),
    ("flag-without-value", "train", lambda t: ["--learning_rate"], 2, "expected one argument"),
    (
        "stray-positional",
        "train",
        lambda t: ["--lora_target_modules", "q_proj", "--lora_r", "8", "v_proj"],
        2,
        "unexpected argument 'v_proj'",
    ),
    ("bad-bool", "train", lambda t: ["--bf16", "maybe"], 2, "bf16: cannot read 'maybe' as bool"),
    ("bad-choice", "train", lambda t: ["--dataset_format", "sharegpt"], 2, "dataset_format must be one of"),
    (
        "all-linear-plus-names",
        "train",
        lambda t: ["--lora_target_modules", "all-linear", "q_proj"],
        2,
        "give it alone",
    ),
    ("use-peft-false", "train", lambda t: ["--use_peft", "false"], 2, "always trains a LoRA adapter"),
    ("push-without-repo", "train", lambda t: ["--push_to_hub"], 2, "push_to_hub: true needs hub_model_id"),
    (
        "plan-zero-gpus",
        "plan",
        lambda t: ["--model_config", str(shared_asset(LLAMA_8B)), "--num_gpus", "0"],
        2,
        "--num_gpus must be positive; got 0",
    ),
    (
        "plan-negative-memory",
        "plan",
        lambda t: ["--model_config", str(shared_asset(LLAMA_8B)), "--gpu_memory_gb", "-8"],
        2,
        "--gpu_memory_gb must be positive",
    ),
    ("plan-unknown-gpu", "plan", lambda t: ["--gpu", "GTX480"], 2, "invalid choice: 'GTX480'"),
    (
        "plan-unknown-architecture",
        "plan",
        lambda t: ["--model_config", _config(t, "notamodel")],
        2,
        "config.json has model_type 'notamodel', which transformers",
    ),
    (
        "plan-missing-config",
        "plan",
        lambda t: ["--model_config", str(t / "no-model")],
        2,
        "no such folder, and not a Hub model id",
    ),
    (
        "generate-zero-tokens",
        "generate",
        lambda t: ["--model", str(t), "--prompt", "hi", "--max_new_tokens", "0"],
        2,
        "--max_new_tokens must be positive; got 0",
    ),
    ("generate-no-source", "generate", lambda t: ["--prompt", "hi"], 2, "one of the arguments --adapter --model"),
    ("preview-negative-count", "preview", lambda t: ["--num_examples", "-1"], 2, "--num_examples must be >= 0"),
    (
        "push-bad-retries",
        "push",
        lambda t: ["--path", str(t), "--repo_id", "me/x", "--max_retries", "-1"],
        2,
        "--max_retries must be >= 0",
    ),
    # each command's own numeric flags have declared ranges too, checked at parse time
    (
        "generate-nan-temperature",
        "generate",
        lambda t: ["--model", str(t), "--prompt", "hi", "--temperature", "nan"],
        2,
        "--temperature: nan is not a finite number",
    ),
    (
        "generate-top-p-zero",
        "generate",
        lambda t: ["--model", str(t), "--prompt", "hi", "--top_p", "0"],
        2,
        "--top_p must be in (0, 1]; got 0.0",
    ),
    (
        "plan-nan-memory",
        "plan",
        lambda t: ["--gpu_memory_gb", "nan"],
        2,
        "--gpu_memory_gb: nan is not a finite number",
    ),
    ("plan-mfu-over-one", "plan", lambda t: ["--mfu", "1.5"], 2, "--mfu must be in (0, 1]; got 1.5"),
    (
        "push-negative-retries",
        "push",
        lambda t: ["--path", str(t), "--repo_id", "a/b", "--max_retries", "-1"],
        2,
        "--max_retries must be >= 0; got -1",
    ),
    # configs and data a careless user points at (issue 23, the rest of the table)
    ("config-is-a-folder", "train", lambda t: ["--config", str(t)], 2, "is a folder: give the recipe's YAML file"),
    (
        "plan-zero-layers",
        "plan",
        lambda t: ["--model_config", _sized(t, num_hidden_layers=0)],
        2,
        "num_hidden_layers 0",
    ),
    (
        "plan-zero-vocabulary",
        "plan",
        lambda t: ["--model_config", _sized(t, vocab_size=0, pad_token_id=None, bos_token_id=None, eos_token_id=None)],
        2,
        "vocab_size 0",
    ),
    (
        "plan-encoder-config",
        "plan",
        lambda t: ["--model_config", _encoder(t)],
        2,
        "BertLMHeadModel has no decoder layers at .bert.layers: is it a decoder-only causal LM transformers builds?",
    ),
    (
        "mixture-one-file-by-two-paths",
        "preview",
        lambda t: ["--datasets", f"{{name: {_data(t)}}}", f"{{name: {_data(t).parent}/./{_data(t).name}}}"],
        2,
        "is listed twice (the same data as datasets[0], ",
    ),
    (
        "mixture-weights-that-would-expand-without-end",
        "preview",
        lambda t: [
            *("--model_name_or_path", str(shared_asset("tokenizers/llama2"))),
            *("--datasets", f"{{name: {_data(t, 'many', rows=40)}, weight: 1}}"),
            f"{{name: {_data(t, 'one')}, weight: 1000000}}",
            *("--mixture_stopping_strategy", "all_exhausted"),
        ],
        2,
        "would make the all_exhausted mixture about 40,000,040 examples, over 100x its 41 rows (datasets[0] d.jsonl: 40 rows at a 1e-06 share)",
    ),
    (
        "preview-ambiguous-source",
        "preview",
        lambda t: ["--datasets", f"{{name: {_data(t)}}}", f"{{name: {_data(t, 'sub')}}}", "--source", "d.jsonl"],
        2,
        "--source d.jsonl names 2 of this recipe's datasets (0: ",
    ),
    (
        "push-invalid-base-id",
        "push",
        lambda t: ["--path", str(t), "--repo_id", "a/b", "--base_model_id", "not an id!!"],
        2,
        "--base_model_id 'not an id!!' is not a valid Hub repo id",
    ),
    (
        "merge-abbreviated-flag",
        "merge",
        lambda t: ["--adapt", str(t), "--output", str(t / "m")],
        2,
        "unknown flag --adapt; did you mean --adapter?",
    ),
]


def _sized(tmp_path: Path, **changes: int | None) -> str:
    """A Llama config.json (the shared Llama 3 8B's) with some sizes changed."""
    import json

    config = json.loads((shared_asset(LLAMA_8B) / "config.json").read_text())
    path = tmp_path / "sized" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**config, **changes}))
    return str(path)


def _encoder(tmp_path: Path) -> str:
    path = tmp_path / "bert" / "config.json"
    path.parent.mkdir()
    path.write_text(
        '{"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, '
        '"intermediate_size": 128, "vocab_size": 100, "is_decoder": true}'
    )
    return str(path)


def _data(tmp_path: Path, folder: str = "", rows: int = 1) -> Path:
    path = tmp_path / folder / "d.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f'{{"instruction": "q{i}", "input": "", "output": "a{i}"}}\n' for i in range(rows)))
    return path


def _binary(tmp_path: Path) -> str:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("lora_r: 8 # caf\xe9\n".encode("latin-1"))
    return str(path)


def _config(tmp_path: Path, model_type: str) -> str:
    folder = tmp_path / "weird-model"
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"model_type": "{model_type}", "hidden_size": 8}}')
    return str(folder)


@pytest.mark.parametrize("name, command, argv, code, phrase", ROWS, ids=[row[0] for row in ROWS])
def test_one_line_and_nothing_loaded(name, command, argv, code, phrase, tmp_path, capsys, monkeypatch):
    import hf_lora_recipe.model.loading as modeling

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded for input that could be refused without one")

    monkeypatch.setattr(modeling, "load_base_model", never)
    monkeypatch.chdir(tmp_path)
    arguments = argv(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    main = importlib.import_module(f"hf_lora_recipe.commands.{command}").main
    assert main(arguments) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("hf-lora-recipe: error: ") and phrase in lines[-1], err
    assert not (tmp_path / "outputs").exists()  # no output_dir was created
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.slow  # a real pipe needs a real process (~8 s); CI runs it
def test_a_closed_pipe_ends_quietly():
    """`hf-lora-recipe preview ... | head -1`: the reader goes away; no BrokenPipe traceback."""
    command = [
        CLI,
        "preview",
        "--model_name_or_path",
        str(shared_asset("tokenizers/llama2")),
        "--dataset_name",
        str(shared_asset("data/alpaca_en_demo.json")),
        "--num_examples",
        "400",
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does after its line
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert first.startswith(b"data: ") and "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.parametrize("stdin, prompt", [("Name three colours.\n", "Name three colours."), ("\n", None)])
def test_generate_prompt_dash_reads_stdin(stdin, prompt, tmp_path, capsys, monkeypatch):
    """``--prompt -`` takes the user turn from stdin (before any model loads); empty stdin is one line."""
    import io

    import hf_lora_recipe.commands.generate as command

    asked = []
    monkeypatch.setattr(command, "load_for_inference", lambda *args: ("model", "tokenizer"))
    monkeypatch.setattr(command, "generate", lambda model, tokenizer, text, *rest: asked.append(text))
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = command.main(["--model", str(tmp_path), "--prompt", "-"])
    if prompt is None:
        assert code == 2 and asked == []
        assert capsys.readouterr().err.strip() == (
            "hf-lora-recipe: error: --prompt -: stdin held no text; pipe the prompt in, or give it as --prompt TEXT"
        )
    else:
        assert code == 0 and asked == [prompt]


def test_the_command_line_data_replaces_the_recipe_files_data(tmp_path):
    """--datasets over a recipe's dataset_name (and --dataset_name over its datasets): the command line wins."""
    from hf_lora_recipe.commands.preview import PARSER

    single = _recipe(tmp_path, "dataset_name: theirs.jsonl\ndataset_format: alpaca\n")
    recipe, _ = PARSER.parse_recipe(["--config", single, "--datasets", f"{{name: {_data(tmp_path)}}}"])
    assert recipe.dataset_name == "tatsu-lab/alpaca" and [s["name"] for s in recipe.datasets] == [str(_data(tmp_path))]
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("datasets:\n  - {name: theirs.jsonl}\n")
    recipe, _ = PARSER.parse_recipe(["--config", str(mixture), "--dataset_name", "mine.jsonl"])
    assert recipe.dataset_name == "mine.jsonl" and recipe.datasets == []
