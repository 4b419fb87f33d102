"""`hf-lora-recipe eval`: base vs adapter (vs merged) on the run's held-out rows, into the table, JSON and card.

The adapters are built in-process (tests/fixtures.py) on the tiny base: random non-zero B stands in for a
trained adapter, all-zero B for one that never trained. Every run uses a handful of Alpaca rows and a few new
tokens, so each evaluation takes about a second.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from hf_lora_recipe.commands.eval import main
from hf_lora_recipe.evaluation.scoring import (
    evaluate_adapter,
    evaluate_after_training,
    format_table,
    load_adapter,
    load_eval_tokenizer,
)
from hf_lora_recipe.recipe.schema import load_recipe, load_recipe_dict
from hf_lora_recipe.shipping.model_card import render_card
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX

from .conftest import CLI, run_cli, shared_asset
from .fixtures import build_adapter_dir


FIELDS = {
    "response_loss",
    "perplexity",
    "stop_rate",
    "mean_length",
    "exact_match",
    "rouge_l",
    "num_examples",
    "supervised_tokens",
}
HELD_OUT = 4  # eval_split_size of the fixture's recipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 64-wide model gains nothing from a second thread, and on a busy machine OpenMP's waiting costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(tiny_base, alpaca_path, tmp_path_factory) -> Path:
    """A finished run (random non-zero B) whose recipe holds HELD_OUT Alpaca rows out, as train would."""
    return build_adapter_dir(
        tiny_base,
        tmp_path_factory.mktemp("eval") / "adapter",
        dataset_name=str(alpaca_path),
        eval_split_size=float(HELD_OUT),
        max_length=64,
    )


def _copy(adapter: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    """The command's one error line: progress bars may come before it, nothing after."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if line.startswith("hf-lora-recipe: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    return errors[0]


def _table_row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(label))
    return line[len(label) :].split()


def _held_out(adapter: Path):
    """The held-out examples exactly as train built them (data.train_and_eval with the run's recipe)."""
    from hf_lora_recipe.data.pipeline import train_and_eval

    _, held_out, _ = train_and_eval(load_recipe(adapter / "recipe.yaml"), load_eval_tokenizer(adapter))
    return held_out


def test_base_and_adapter_differ_and_the_json_matches_the_table(adapter, tmp_path, capsys):
    adapter = _copy(adapter, tmp_path)
    code, out, err = _run(capsys, "--adapter", str(adapter), "--max_new_tokens", "6", "--batch_size", "3", "--json")
    assert code == 0, err[-3000:]
    report = json.loads(out)  # stdout is the JSON object alone
    assert {"dataset", "split", "num_examples", "max_new_tokens", "models"} <= set(report)
    assert report["dataset"].endswith("alpaca_en_demo.json") and report["max_new_tokens"] == 6
    assert report["split"] == "train, 4 rows held out by eval_split_size, seed 0"
    base, tuned = report["models"]["base"], report["models"]["adapter"]
    held_out = _held_out(adapter)
    supervised = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in held_out["labels"])
    for figures in (base, tuned):
        assert set(figures) == FIELDS
        assert figures["num_examples"] == report["num_examples"] == HELD_OUT
        assert figures["supervised_tokens"] == supervised  # the very rows (and masks) training held out
        assert math.isclose(figures["perplexity"], math.exp(figures["response_loss"]), rel_tol=1e-12)
        assert all(0.0 <= figures[key] <= 1.0 for key in ("stop_rate", "exact_match", "rouge_l"))
        assert 0 <= figures["mean_length"] <= 6
    assert base["response_loss"] != tuned["response_loss"]  # random non-zero B changes the model

    # the table (on stderr with --json) shows the same figures
    table = err[err.index("base vs adapter on 4 examples") :]
    assert _table_row(table, "metric") == ["base", "adapter"]
    assert _table_row(table, "response loss") == [f"{base['response_loss']:.4f}", f"{tuned['response_loss']:.4f}"]
    assert _table_row(table, "perplexity") == [f"{base['perplexity']:,.2f}", f"{tuned['perplexity']:,.2f}"]
    assert _table_row(table, "ROUGE-L F1") == [f"{base['rouge_l']:.4f}", f"{tuned['rouge_l']:.4f}"]
    assert _table_row(table, "stops at end of turn") == [f"{base['stop_rate']:.1%}", f"{tuned['stop_rate']:.1%}"]

    # the loss is the training loss: per example, the model's own masked cross-entropy, weighted by tokens
    model = load_adapter(load_recipe(adapter / "recipe.yaml"), adapter)
    total = 0.0
    with torch.no_grad():
        for input_ids, labels in zip(held_out["input_ids"], held_out["labels"]):
            n = sum(label != IGNORE_INDEX for label in labels[1:])
            total += n * model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss.item()
    assert math.isclose(tuned["response_loss"], total / supervised, rel_tol=1e-5)


def test_the_card_section_is_written_replaced_and_kept_by_push(adapter, tmp_path, capsys, alpaca_path):
    adapter = _copy(adapter, tmp_path)
    before = (adapter / "README.md").read_text()
    assert "## Evaluation" not in before
    for max_new_tokens in ("3", "2"):
        code, out, err = _run(
            capsys, "--adapter", str(adapter), "--num_examples", "2", "--max_new_tokens", max_new_tokens
        )
        assert code == 0, err[-3000:]
        assert "base vs adapter on 2 examples" in out and "evaluation written into" in out
    card = (adapter / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "at most 2 new tokens" in card and "at most 3 new" not in card
    section = card[card.index("## Evaluation") : card.index("## Prompt template")]
    assert "| metric | base | adapter |" in section and "| response loss | " in section
    # the rest of the card is untouched, bar the model-index metadata
    body = card[card.index("\n---\n") :]
    assert body.replace(section, "") == before[before.index("\n---\n") :]
    results = json.loads((adapter / "training_results.json").read_text())
    assert results["evaluation"]["max_new_tokens"] == 2 and results["final_train_loss"] == 1.5
    # push re-renders the card from recipe.yaml and training_results.json: the same card, section included
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    rendered = render_card(recipe, results, str(Path(recipe["output_dir"]).resolve()), "adapter", has_plot=True)
    assert rendered == card
    metadata = yaml.safe_load(card.split("---\n")[1])
    from huggingface_hub.repocard_data import model_index_to_eval_results

    _, evals = model_index_to_eval_results(metadata["model-index"])
    assert {e.metric_type for e in evals} == {"perplexity", "exact_match", "rouge"}
    assert next(e for e in evals if e.metric_type == "perplexity").metric_value == round(
        results["evaluation"]["models"]["adapter"]["perplexity"], 4
    )

    # --no_card leaves it alone; --dataset/--split evaluate other rows
    code, out, err = _run(
        capsys,
        "--adapter",
        str(adapter),
        "--dataset",
        str(alpaca_path),
        "--split",
        "train",
        "--num_examples",
        "1",
        "--max_new_tokens",
        "1",
        "--no_card",
    )
    assert code == 0, err[-3000:]
    assert "on 1 examples of" in out and "(train)" in out
    assert (adapter / "README.md").read_text() == card


def test_an_adapter_with_all_zero_b_had_no_effect(adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    adapter = _copy(adapter, tmp_path)
    weights = load_file(adapter / "adapter_model.safetensors")
    zeroed = {name: torch.zeros_like(t) if "lora_B" in name else t for name, t in weights.items()}
    assert any("lora_B" in name for name in weights)
    save_file(zeroed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    card = (adapter / "README.md").read_text()
    code, out, err = _run(capsys, "--adapter", str(adapter), "--num_examples", "2", "--max_new_tokens", "3")
    assert code == 2
    assert _error_line(err).startswith(
        "hf-lora-recipe: error: the adapter had no effect: the adapter gives exactly the base's response loss"
    )
    assert (adapter / "README.md").read_text() == card  # nothing recorded


def test_merged_model_is_a_third_column_close_to_the_adapter(adapter, tmp_path, capsys):
    from hf_lora_recipe.shipping.merging import merge

    merged = merge(str(adapter), tmp_path / "merged", dtype="float32")
    code, out, err = _run(
        capsys,
        "--adapter",
        str(adapter),
        "--model",
        str(merged),
        "--num_examples",
        "2",
        "--max_new_tokens",
        "2",
        "--json",
        "--no_card",
    )
    assert code == 0, err[-3000:]
    models = json.loads(out)["models"]
    assert list(models) == ["base", "adapter", "merged"]
    assert math.isclose(models["merged"]["response_loss"], models["adapter"]["response_loss"], rel_tol=1e-4)
    assert models["merged"]["response_loss"] != models["base"]["response_loss"]
    # the merged model alone: its recipe.yaml (copied by merge) names the base and the held-out rows
    code, out, err = _run(
        capsys, "--model", str(merged), "--num_examples", "1", "--max_new_tokens", "1", "--json", "--no_card"
    )
    assert code == 0, err[-3000:]
    assert list(json.loads(out)["models"]) == ["base", "merged"]


def test_train_evaluates_in_place_on_the_main_process_only(adapter, tmp_path, capsys, monkeypatch):
    adapter = _copy(adapter, tmp_path)
    recipe = load_recipe(adapter / "recipe.yaml")
    model, tokenizer = load_adapter(recipe, adapter), load_eval_tokenizer(adapter)
    held_out = _held_out(adapter)
    card = (adapter / "README.md").read_text()
    monkeypatch.setenv("RANK", "1")  # another rank of a multi-process launch: nothing to do
    evaluate_after_training(replace(recipe, final_eval_examples=2), adapter, held_out, model, tokenizer)
    monkeypatch.setenv("RANK", "0")
    evaluate_after_training(replace(recipe, final_eval_examples=0), adapter, held_out, model, tokenizer)
    evaluate_after_training(recipe, adapter, None, model, tokenizer)  # no held-out set
    assert capsys.readouterr().out == "" and (adapter / "README.md").read_text() == card

    model.train()  # as the trainer leaves it
    evaluate_after_training(replace(recipe, final_eval_examples=2, max_length=8), adapter, held_out, model, tokenizer)
    out = capsys.readouterr().out
    assert "[hf-lora-recipe] base vs adapter on 2 examples" in out and "at most 8 new tokens" in out
    assert model.training  # handed back as it came
    assert "at most 8 new tokens" in (adapter / "README.md").read_text()


def test_evaluate_adapter_takes_a_loaded_model_and_raw_rows(adapter, alpaca_path):
    recipe = load_recipe(adapter / "recipe.yaml")
    model, tokenizer = load_adapter(recipe, adapter), load_eval_tokenizer(adapter)
    rows = json.loads(alpaca_path.read_text())[:3]
    card = (adapter / "README.md").read_text()
    report = evaluate_adapter(
        recipe,
        adapter,
        rows,
        model=model,
        tokenizer=tokenizer,
        num_examples=2,
        max_new_tokens=2,
        write_card=False,
        progress=False,
        dataset="three rows",
        split="demo",
    )
    assert report["num_examples"] == 2 and list(report["models"]) == ["base", "adapter"]
    assert format_table(report).startswith("base vs adapter on 2 examples of three rows (demo)")
    conversations = [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}] for r in rows
    ]
    report = evaluate_adapter(
        recipe,
        adapter,
        [{"messages": c} for c in conversations],
        model=model,
        tokenizer=tokenizer,
        num_examples=1,
        max_new_tokens=1,
        write_card=False,
        progress=False,
    )
    assert report["num_examples"] == 1
    assert (adapter / "README.md").read_text() == card


def _no_recipe(t: Path, adapter: Path) -> list[str]:
    folder = t / "foreign"
    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    return ["--adapter", str(folder)]


def _no_held_out(t: Path, adapter: Path) -> list[str]:
    folder = Path(shutil.copytree(adapter, t / "no-held-out"))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "eval_split_size": 0.0}))
    return ["--adapter", str(folder)]


def _model_unlike(t: Path, adapter: Path, what: str) -> list[str]:
    """A merged-model folder (config and tokenizer only: nothing loads) that is not a merge of ``adapter``."""
    model = t / "merged"
    model.mkdir()
    base = yaml.safe_load((adapter / "recipe.yaml").read_text())["model_name_or_path"]
    config = json.loads((Path(base) / "config.json").read_text())
    if what == "width":
        config = {**config, "hidden_size": 96, "head_dim": 24}
    (model / "config.json").write_text(json.dumps(config))
    tokenizer = shared_asset("tokenizers/gpt-neox-20b") if what == "tokenizer" else adapter
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, model / name)
    return ["--adapter", str(adapter), "--model", str(model)]


def _recipe_base_gone(t: Path, adapter: Path) -> list[str]:
    folder = Path(shutil.copytree(adapter, t / "moved"))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "model_name_or_path": str(t / "gone-base")}))
    return ["--adapter", str(folder)]


HOSTILE = [
    ("no-source", lambda t, a: [], "give --adapter DIR (base vs adapter), --model MERGED_DIR"),
    ("adapter-missing", lambda t, a: ["--adapter", str(t / "nope")], "no such folder"),
    ("adapter-is-a-file", lambda t, a: ["--adapter", str(a / "recipe.yaml")], "is a file"),
    ("not-an-adapter", lambda t, a: ["--adapter", str(t)], "no adapter_config.json there"),
    (
        "no-recipe-no-dataset",
        _no_recipe,
        "has no recipe.yaml (not trained by hf-lora-recipe?), so its held-out set is unknown: pass --dataset",
    ),
    ("no-held-out-set", _no_held_out, "had no held-out set"),
    (
        "zero-examples",
        lambda t, a: ["--adapter", str(a), "--num_examples", "0"],
        "--num_examples must be positive; got 0",
    ),
    (
        "negative-examples",
        lambda t, a: ["--adapter", str(a), "--num_examples", "-3"],
        "--num_examples must be positive; got -3",
    ),
    (
        "zero-new-tokens",
        lambda t, a: ["--adapter", str(a), "--max_new_tokens", "0"],
        "--max_new_tokens must be positive",
    ),
    ("zero-batch", lambda t, a: ["--adapter", str(a), "--batch_size", "0"], "--batch_size must be positive"),
    (
        "batch-word",
        lambda t, a: ["--adapter", str(a), "--batch_size", "many"],
        "argument --batch_size: invalid int or auto value: 'many'",
    ),
    (
        "dataset-missing",
        lambda t, a: ["--adapter", str(a), "--dataset", str(t / "nope.json")],
        "--dataset " + "{t}/nope.json: no such file or folder",
    ),
    (
        "split-missing",
        lambda t, a: ["--adapter", str(a), "--split", "validation"],
        "--split: 'validation' is not a split of",
    ),
    ("model-not-a-model", lambda t, a: ["--model", str(t)], "no config.json there"),
    (
        "model-of-another-base",
        lambda t, a: _model_unlike(t, a, "width"),
        "down_proj has 96 output features, the adapter's 64: it is not the adapter's base",
    ),
    (
        "model-with-another-tokenizer",
        lambda t, a: _model_unlike(t, a, "tokenizer"),
        "has another tokenizer than --adapter",
    ),
    ("recipe-base-gone", _recipe_base_gone, "gone-base is not there; put the base back there, or set"),
    ("abbreviated-flag", lambda t, a: ["--adapt", str(a)], "unknown flag --adapt; did you mean --adapter?"),
]


@pytest.mark.parametrize("argv, phrase", [row[1:] for row in HOSTILE], ids=[row[0] for row in HOSTILE])
def test_hostile_input_is_one_line_before_anything_loads(argv, phrase, adapter, tmp_path, capsys, monkeypatch):
    import hf_lora_recipe.evaluation.scoring as evaluation

    def never(*args, **kwargs):
        raise AssertionError("loaded something before refusing")

    for name in ("load_eval_tokenizer", "load_examples", "load_base", "load_adapter", "load_merged"):
        monkeypatch.setattr(evaluation, name, never)
    code, out, err = _run(capsys, *argv(tmp_path, adapter))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("hf-lora-recipe: error:"), err
    assert phrase.format(t=tmp_path) in err


def test_the_command_is_registered(tmp_path):
    result = run_cli(CLI, "eval", "--adapter", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr == (
        f"hf-lora-recipe: error: --adapter {tmp_path / 'nope'}: no such folder; give the "
        "adapter's folder (a training output_dir)\n"
    )


# ---------------------------------------------------------------- what eval scores (issue 23 item 3)


@pytest.fixture(scope="module")
def trained_run(tiny_base, alpaca_path, tmp_path_factory) -> Path:
    """A real 1-step run holding HELD_OUT rows out: it records its training examples' identities."""
    from hf_lora_recipe.commands.train import main as train_main

    output_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(_train_flags(tiny_base, alpaca_path, output_dir, "--max_steps", "1")) == 0
    return output_dir


def _train_flags(tiny_base: Path, alpaca_path: Path, output_dir: Path, *more: str) -> list[str]:
    """train on the tiny base in fp32, holding HELD_OUT Alpaca rows out; ``more`` flags after these (argparse
    keeps the last of a repeated flag)."""
    flags = [
        "--model_name_or_path",
        str(tiny_base),
        "--dataset_name",
        str(alpaca_path),
        "--output_dir",
        str(output_dir),
    ]
    flags += ["--eval_split_size", str(HELD_OUT), "--global_batch_size", "4", "--max_length", "64"]
    return [*flags, "--load_in_4bit", "false", "--bf16", "false", "--final_eval_examples", "0", *more]


def test_scoring_training_rows_is_refused_unless_asked_and_then_never_called_held_out(
    trained_run, alpaca_path, tmp_path, capsys
):
    run = _copy(trained_run, tmp_path)
    training_rows = ["--adapter", str(run), "--dataset", str(alpaca_path), "--split", "train", "--num_examples", "6"]
    code, _, err = _run(capsys, *training_rows, "--max_new_tokens", "2")
    assert code == 2
    assert _error_line(err).endswith(
        "6 of the 6 examples to score were trained on (their token ids match the run's training examples): score "
        "held-out data, or pass --allow_training_rows to score them as training rows"
    )
    code, out, err = _run(capsys, *training_rows, "--max_new_tokens", "2", "--allow_training_rows", "--json")
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["trained_on"] == 6 and report["dataset"] == "alpaca_en_demo.json"
    card = (run / "README.md").read_text()
    assert "**6 of these examples were in the training data: these are not held-out results.**" in card
    assert "model-index" not in card

    # its own held-out rows: the demo data holds 14 rows twice, and one held-out row's twin was trained on
    code, out, err = _run(capsys, "--adapter", str(run), "--max_new_tokens", "2", "--json")
    assert code == 0, err[-2000:]
    assert "1 of the 4 held-out examples also occur among the training examples (rows the data holds twice)" in err
    assert json.loads(out)["trained_on"] == 1 and "model-index" not in (run / "README.md").read_text()


def test_a_changed_data_file_cannot_give_back_the_held_out_rows(tiny_base, alpaca_path, tmp_path, capsys):
    data = tmp_path / "alpaca.json"
    shutil.copy(alpaca_path, data)
    run = build_adapter_dir(tiny_base, tmp_path / "run", dataset_name=str(data), eval_split_size=4.0, max_length=64)
    rows = json.loads(data.read_text())
    data.write_text(json.dumps(rows[1:]))  # one row fewer: the seed's split now holds out other rows
    code, _, err = _run(capsys, "--adapter", str(run))
    assert code == 2
    line = _error_line(err)
    assert "alpaca.json changed since training (local files, sha256 " in line
    assert line.endswith(
        "so the rows eval_split_size held out cannot be found again; pass --dataset and --split to score other data"
    )


def test_a_mixture_run_is_named_by_its_sources(tiny_base, alpaca_path, tmp_path, capsys):
    second = tmp_path / "second.json"
    second.write_text(json.dumps(json.loads(alpaca_path.read_text())[:60]))
    sources = load_recipe_dict(
        {"datasets": [{"name": str(alpaca_path), "weight": 1.0}, {"name": str(second), "weight": 1.0}]}
    ).datasets
    run = build_adapter_dir(tiny_base, tmp_path / "run", datasets=sources, eval_split_size=4.0, max_length=64)
    code, out, err = _run(capsys, "--adapter", str(run), "--max_new_tokens", "2", "--json")
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["dataset"] == "alpaca_en_demo.json + second.json"  # never the default dataset_name
    card = (run / "README.md").read_text()
    assert "`alpaca_en_demo.json + second.json`" in card and "tatsu-lab/alpaca" not in card.split("## Evaluation")[1]


def test_the_reply_budget_is_sized_from_the_references():
    from hf_lora_recipe.evaluation.scoring import Example, reference_lengths, reply_budget

    def example(reply_tokens: int) -> Example:  # a 3-token prompt, then the supervised reply and its end of turn
        labels = [-100] * 3 + list(range(10, 10 + reply_tokens))
        return Example(input_ids=list(range(3 + reply_tokens)), labels=labels, prompt_ids=[0, 1, 2], reference="x")

    examples = [example(n) for n in [4] * 19 + [40]]  # 20 references: the 95th percentile is the 19th, 4 tokens
    assert reference_lengths(examples)[:2] == [4, 4]
    assert reply_budget(examples) == 5  # ceil(4 x 1.25)
    assert reply_budget([example(n) for n in [4] * 18 + [40, 40]]) == 50  # two long ones: the 95th reaches them
    assert reply_budget([example(400)]) == 256 and reply_budget([example(400)], cap=300) == 300  # capped


def test_auto_batch_sizes_grow_with_memory_and_with_shorter_passes(tiny_base):
    from transformers import AutoConfig

    from hf_lora_recipe.evaluation.scoring import EVAL_BATCH_CAP, Example, eval_batch_sizes

    config = AutoConfig.from_pretrained(tiny_base)
    examples = [Example(list(range(200)), [IGNORE_INDEX] * 200, list(range(120)), "") for _ in range(40)]
    per_logit = 200 * config.vocab_size * 12  # one example's full logits and the loss's fp32 copies of them

    def sizes(budget, new_tokens=32, compute_bytes=4):
        return eval_batch_sizes(config, examples, new_tokens, compute_bytes, budget)

    assert sizes(0) == (1, 1)  # never none: one example at a time is the floor
    scoring, generation = sizes(10 * per_logit)
    assert 1 < scoring <= 10 and generation > scoring  # generation keeps one position's logits, not 200
    assert sizes(10**15) == (min(EVAL_BATCH_CAP, 40), min(EVAL_BATCH_CAP, 40))  # capped by the examples
    assert sizes(10 * per_logit, new_tokens=4000)[1] < generation  # a longer reply needs a longer KV cache
    assert sizes(10 * per_logit, compute_bytes=2)[0] >= scoring


def test_auto_batch_sizes_are_logged_and_used(adapter, tmp_path, capsys, monkeypatch):
    """The default (auto) sizes each pass within memory_budget_gb, says so on stderr beside the JSON, and the
    passes run with those sizes (here ~10 MB: one example's scoring pass, with its full logits, and a few
    examples' generation, which keeps the last position's)."""
    import hf_lora_recipe.evaluation.scoring as scoring

    adapter = _copy(adapter, tmp_path)
    recipe_file = adapter / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    recipe["memory_budget_gb"] = 0.01
    recipe_file.write_text(yaml.safe_dump(recipe))
    calls = []
    real_loss, real_replies = scoring.response_loss, scoring.greedy_replies
    monkeypatch.setattr(
        scoring,
        "response_loss",
        lambda m, e, p, size, *a: calls.append(("loss", size)) or real_loss(m, e, p, size, *a),
    )
    monkeypatch.setattr(
        scoring,
        "greedy_replies",
        lambda m, e, eos, pad, new, size, *a: (
            calls.append(("generate", size)) or real_replies(m, e, eos, pad, new, size, *a)
        ),
    )
    code, out, err = _run(capsys, "--adapter", str(adapter), "--max_new_tokens", "4", "--json")
    assert code == 0, err[-3000:]
    json.loads(out)
    line = re.search(
        r"eval batch auto -> scoring (\d+), generation (\d+) examples per pass, within ([\d.]+) GiB \(memory_budget_gb\)",
        err,
    )
    assert line, err[-2000:]
    chosen = {"loss": int(line[1]), "generate": int(line[2])}
    assert set(calls) == {("loss", chosen["loss"]), ("generate", chosen["generate"])}
    assert 1 <= chosen["loss"] < chosen["generate"] < HELD_OUT  # each pass sized on its own, within the budget


# ---------------------------------------------------------------- the final evaluation reads the trainer's (issue 25)


@pytest.mark.parametrize(
    "loss_flags, final_examples, kept_examples",
    [
        # micro-batch 2: the trainer's second held-out batch is past the 1 example evaluated, so nothing is kept
        (["--lm_head_loss", "plain", "--per_device_train_batch_size", "2"], 1, 2),
        (["--lm_head_loss", "fused", "--padding_free", "false"], 3, HELD_OUT),
    ],
    ids=["model-cross-entropy-packed", "trl-fused-head-padded"],
)
def test_the_final_evaluation_takes_the_adapter_loss_from_the_trainers_evaluate_pass(
    tiny_base, alpaca_path, tmp_path, monkeypatch, loss_flags, final_examples, kept_examples
):
    """train's end-of-training evaluation scores the adapter's loss once: the trainer's final evaluate pass keeps
    each held-out example's loss, and the report's adapter loss is read from it (the base is still scored).
    Packed rows split at their position ids and padded rows give the figure a separate scoring pass gives."""
    import hf_lora_recipe.evaluation.scoring as scoring
    from hf_lora_recipe.commands.train import main as train_main

    scored, seen = [], {}
    real_loss, real_evaluate = scoring.response_loss, scoring.evaluate_adapter
    monkeypatch.setattr(
        scoring, "response_loss", lambda m, e, p, size, label="", *a: scored.append(label) or real_loss(m, e, p, size)
    )

    def evaluate_adapter(*args, **kwargs):
        report = real_evaluate(*args, **kwargs)
        seen.update(kwargs, report=report)
        return report

    monkeypatch.setattr(scoring, "evaluate_adapter", evaluate_adapter)
    output_dir = tmp_path / "run"
    more = ["--max_steps", "2", "--final_eval_examples", str(final_examples), *loss_flags]
    assert train_main(_train_flags(tiny_base, alpaca_path, output_dir, *more)) == 0

    assert scored == ["base"]  # the adapter's loss came from the trainer's pass
    kept = seen["adapter_loss_sums"]
    assert len(kept) == kept_examples and all(tokens > 0 for _, tokens in kept)
    recipe = load_recipe(output_dir / "recipe.yaml")
    examples = scoring.examples_for(recipe, seen["tokenizer"], _held_out(output_dir), final_examples)
    model = seen["model"]
    model.eval()
    with torch.no_grad():
        separate, tokens = real_loss(model, examples, seen["tokenizer"].pad_token_id, 1)
    adapter = seen["report"]["models"]["adapter"]
    assert adapter["supervised_tokens"] == tokens == sum(count for _, count in kept[:final_examples])
    assert math.isclose(adapter["response_loss"], separate, rel_tol=1e-5)
    assert adapter["response_loss"] != seen["report"]["models"]["base"]["response_loss"]


def test_kept_losses_that_do_not_fit_the_examples_are_not_used():
    from hf_lora_recipe.evaluation.scoring import Example, fold_adapter_losses

    examples = [Example([1, 5, 6, 2], [IGNORE_INDEX, IGNORE_INDEX, 6, 2], [1, 5], "x")] * 2  # 2 supervised each
    assert fold_adapter_losses(examples, [(1.0, 2), (3.0, 2), (9.0, 4)]) == [(1.0, 2), (3.0, 2)]
    assert fold_adapter_losses(examples, None) is None  # not kept (several processes)
    assert fold_adapter_losses(examples, [(1.0, 2)]) is None  # fewer than the examples
    assert fold_adapter_losses(examples, [(1.0, 2), (3.0, 3)]) is None  # other tokens: other rows
