"""Dataset mixtures (``datasets:``): each source cleaned and audited on its own, mixed by datasets' own functions
with the seed, and the realised shares (not the asked ones) reported, on the shared Alpaca and OASST samples."""

from __future__ import annotations

import json

import pytest
import yaml

from hf_lora_recipe.commands.preview import main as preview_main
from hf_lora_recipe.data.mixture import SOURCE_COLUMN
from hf_lora_recipe.data.pipeline import build_sft_dataset, train_and_eval
from hf_lora_recipe.recipe.schema import RecipeError, load_recipe, load_recipe_dict

from .conftest import CLI, run_cli, shared_asset


@pytest.fixture(scope="module")
def sources():
    return str(shared_asset("data/alpaca_en_demo.json")), str(shared_asset("data/oasst2_trees_sample.jsonl"))


def _recipe(tokenizer_dir, entries, **keys):
    return load_recipe_dict({"model_name_or_path": str(tokenizer_dir), "max_length": 256, "datasets": entries, **keys})


@pytest.fixture(scope="module")
def tokenizer_dir():
    return shared_asset("tokenizers/llama2")


@pytest.fixture(scope="module")
def alone(sources, tokenizer_dir, llama2_tokenizer):
    """Each source prepared as a lone dataset_name: what its part of a mixture must equal."""
    alpaca, oasst = sources
    return [
        build_sft_dataset(
            load_recipe_dict(
                {
                    "model_name_or_path": str(tokenizer_dir),
                    "max_length": 256,
                    "dataset_name": name,
                    "dataset_format": fmt,
                }
            ),
            llama2_tokenizer,
        )
        for name, fmt in ((alpaca, "alpaca"), (oasst, "oasst"))
    ]


def _by_source(dataset, count):
    column = dataset[SOURCE_COLUMN]
    return [[dataset[i]["input_ids"] for i in range(len(dataset)) if column[i] == s] for s in range(count)]


def test_weights_give_the_asked_shares_of_examples(sources, tokenizer_dir, llama2_tokenizer, alone):
    alpaca, oasst = sources
    recipe = _recipe(
        tokenizer_dir, [{"name": alpaca, "weight": 0.7}, {"name": oasst, "format": "oasst", "weight": 0.3}]
    )
    mixed, report = build_sft_dataset(recipe, llama2_tokenizer)
    shares = report.mixture
    assert [s["source"] for s in shares] == ["alpaca_en_demo.json", "oasst2_trees_sample.jsonl"]
    assert shares[1]["examples_used"] == shares[1]["examples_kept"] == alone[1][1].examples_out  # first_exhausted
    assert len(mixed) == sum(s["examples_used"] for s in shares) == report.examples_out
    for share, asked in zip(shares, (0.7, 0.3)):
        assert share["asked_share"] == pytest.approx(asked)
        assert share["share_of_examples"] == pytest.approx(asked, abs=0.05)  # ~280 draws: 3 standard deviations
    assert sum(s["share_of_supervised_tokens"] for s in shares) == pytest.approx(1.0)
    # each source's examples are exactly its lone preparation's, in a seeded order (an OASST conversation is longer)
    alpaca_ids, oasst_ids = _by_source(mixed, 2)
    assert oasst_ids == alone[1][0]["input_ids"]
    assert set(map(tuple, alpaca_ids)) <= set(map(tuple, alone[0][0]["input_ids"]))
    assert shares[1]["share_of_supervised_tokens"] > shares[1]["share_of_examples"]
    again, _ = build_sft_dataset(recipe, llama2_tokenizer)
    assert again["input_ids"] == mixed["input_ids"]  # the seed fixes the mixture
    other, _ = build_sft_dataset(_recipe(tokenizer_dir, recipe.datasets, seed=7), llama2_tokenizer)
    assert other["input_ids"] != mixed["input_ids"]

    summary = report.summary().splitlines()
    assert summary[0].startswith("data: source alpaca_en_demo.json: 999 examples in, 999 kept")
    assert summary[1].startswith("data: source oasst2_trees_sample.jsonl: ")
    assert summary[2].startswith(
        f"mixture: {len(mixed)} examples, interleaved by weight (datasets.interleave_datasets, "
        "seed 42, first_exhausted); alpaca_en_demo.json "
    )
    assert "(asked 70.0%)" in summary[2] and "(asked 30.0%)" in summary[2]


def test_all_exhausted_oversamples_the_small_source(sources, tokenizer_dir, llama2_tokenizer, alone):
    alpaca, oasst = sources
    recipe = _recipe(
        tokenizer_dir,
        [{"name": alpaca, "weight": 1}, {"name": oasst, "format": "oasst", "weight": 1}],
        mixture_stopping_strategy="all_exhausted",
    )
    mixed, report = build_sft_dataset(recipe, llama2_tokenizer)
    alpaca_ids, oasst_ids = _by_source(mixed, 2)
    assert set(map(tuple, alpaca_ids)) == set(map(tuple, alone[0][0]["input_ids"]))  # every alpaca example
    assert len(oasst_ids) > len(alone[1][0])  # the small source repeats to keep its half
    assert report.mixture[1]["share_of_examples"] == pytest.approx(0.5, abs=0.05)


def test_fractions_take_that_share_of_each_source(sources, tokenizer_dir, llama2_tokenizer, alone):
    alpaca, oasst = sources
    recipe = _recipe(
        tokenizer_dir, [{"name": alpaca, "fraction": 0.1}, {"name": oasst, "format": "oasst", "fraction": 1}]
    )
    mixed, report = build_sft_dataset(recipe, llama2_tokenizer)
    used = [s["examples_used"] for s in report.mixture]
    assert used == [round(0.1 * alone[0][1].examples_out), alone[1][1].examples_out]
    assert report.mixture[0]["asked_share"] is None and "a fraction of each source (seed 42)" in report.summary()
    whole, _ = build_sft_dataset(
        _recipe(tokenizer_dir, [{"name": alpaca}, {"name": oasst, "format": "oasst"}]), llama2_tokenizer
    )
    assert len(whole) == alone[0][1].examples_out + alone[1][1].examples_out  # neither: everything, concatenated


def test_each_source_keeps_its_own_bad_row_handling(tmp_path, sources, tokenizer_dir, llama2_tokenizer):
    alpaca, _ = sources
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"instruction": "a", "output": "b"},
                {"instruction": "c", "output": None},
                {"instruction": "d", "output": "e"},
            ]
        )
        + "\n"
    )
    entries = [{"name": alpaca, "weight": 1}, {"name": str(bad), "weight": 1}]
    with pytest.raises(RecipeError, match=r"^bad.jsonl line 2: field 'output' is missing or null \(1 bad row"):
        build_sft_dataset(_recipe(tokenizer_dir, entries), llama2_tokenizer)
    _, report = build_sft_dataset(_recipe(tokenizer_dir, entries, on_bad_rows="skip"), llama2_tokenizer)
    assert report.sources[1][1].dropped == {"field 'output' is missing or null": 1}
    assert report.mixture[1]["examples_kept"] == 2


def test_eval_split_holds_out_from_the_mixture(sources, tokenizer_dir, llama2_tokenizer):
    alpaca, oasst = sources
    recipe = _recipe(
        tokenizer_dir,
        [{"name": alpaca, "weight": 1}, {"name": oasst, "format": "oasst", "weight": 1}],
        eval_split_size=20,
    )
    train, held_out, report = train_and_eval(recipe, llama2_tokenizer)
    assert len(held_out) == 20 and len(train) + 20 == report.examples_out


@pytest.mark.parametrize(
    "entries, keys, message",
    [
        ([{"nam": "a.json"}], {}, r"datasets\[0\]: unknown key 'nam'; did you mean 'name'\?"),
        ([{"weight": 1}], {}, r"datasets\[0\]: name .* is missing"),
        (
            [{"name": "a.json", "weight": 1}, {"name": "b.json"}],
            {},
            "every entry gives a weight, or every entry a fraction",
        ),
        ([{"name": "a.json", "fraction": 1.5}], {}, r"datasets\[0\]: fraction must be a number in \(0, 1\]; got 1.5"),
        ([{"name": "a.json", "weight": -1}], {}, r"weight must be a number > 0"),
        ([{"name": "a.json", "weight": 1, "fraction": 0.5}], {}, "give weight or fraction, not both"),
        ([{"name": "a.json"}, {"name": "a.json"}], {}, r"datasets\[1\]: a.json \(train\) is listed twice"),
        ([{"name": "a.json", "format": "sharegpt"}], {}, r"datasets\[0\]: format must be one of"),
        ([{"name": "a.json"}], {"dataset_name": "b.json"}, "datasets replaces dataset_name"),
        ([{"name": "a.json"}], {"dataset_test_split": "test"}, "datasets replaces dataset_test_split"),
        (["a.json"], {}, r"datasets: each entry is a mapping like \{name: data.jsonl, weight: 0.5\}; got 'a.json'"),
        (
            [{"name": "a.json"}],
            {"streaming": True, "max_steps": 5},
            "streaming: a datasets mixture is prepared and mixed whole",
        ),
    ],
)
def test_a_bad_mixture_is_refused_with_the_entry(entries, keys, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe_dict({"datasets": entries, **keys})


def test_command_line_entries_and_saved_recipe_round_trip(tmp_path, sources):
    from hf_lora_recipe.commands.train import PARSER
    from hf_lora_recipe.recipe.schema import dump_recipe

    alpaca, oasst = sources
    recipe, _ = PARSER.parse_recipe(
        ["--datasets", f"{{name: {alpaca}, weight: 2}}", f"{{name: {oasst}, format: oasst, weight: 1}}"]
    )
    assert [s["weight"] for s in recipe.datasets] == [2.0, 1.0] and recipe.datasets[1]["format"] == "oasst"
    dump_recipe(recipe, tmp_path / "recipe.yaml", engine="one process")
    assert load_recipe(tmp_path / "recipe.yaml").datasets == recipe.datasets  # a saved mixture loads back as itself
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["datasets"][0]["name"] == alpaca


def test_preview_shows_one_source(sources, tokenizer_dir, tmp_path, capsys):
    alpaca, oasst = sources
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(tokenizer_dir),
                "max_length": 256,
                "datasets": [{"name": alpaca, "weight": 0.5}, {"name": oasst, "format": "oasst", "weight": 0.5}],
            }
        )
    )
    assert (
        preview_main(
            ["--config", str(recipe), "--source", "oasst2_trees_sample.jsonl", "--num_examples", "5", "--json"]
        )
        == 0
    )
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(shown) == 5 and all(len(s["messages"]) >= 2 and s["messages"][0]["role"] == "user" for s in shown)
    assert all(s["messages"][-1]["role"] == "assistant" for s in shown)
    assert preview_main(["--config", str(recipe), "--source", "0", "--num_examples", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["messages"]) == 2  # an Alpaca example: one turn
    assert preview_main(["--config", str(recipe), "--source", "dolly.jsonl"]) == 2
    assert (
        "hf-lora-recipe: error: --source dolly.jsonl: not one of this recipe's datasets (alpaca_en_demo.json, "
        "oasst2_trees_sample.jsonl)" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_training_on_a_mixture_records_the_realised_shares(tiny_base, sources, tmp_path):
    alpaca, oasst = sources
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"datasets": [{"name": alpaca, "weight": 0.7}, {"name": oasst, "format": "oasst", "weight": 0.3}]}
        )
    )
    out = tmp_path / "run"
    done = run_cli(
        CLI,
        "train",
        "--config",
        str(recipe),
        "--model_name_or_path",
        str(tiny_base),
        "--max_length",
        "64",
        "--load_in_4bit",
        "false",
        "--bf16",
        "false",
        "--global_batch_size",
        "8",
        "--max_steps",
        "2",
        "--output_dir",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mixture: " in done.stdout and "(asked 70.0%)" in done.stdout
    results = json.loads((out / "training_results.json").read_text())
    assert [m["source"] for m in results["mixture"]] == ["alpaca_en_demo.json", "oasst2_trees_sample.jsonl"]
    card = (out / "README.md").read_text()
    assert "alpaca_en_demo.json" in card and "oasst2_trees_sample.jsonl" in card and "70.0%" in card


def test_a_missing_source_is_named_by_its_entry_before_anything_loads(sources):
    from hf_lora_recipe.data.mixture import check_sources

    alpaca, _ = sources
    with pytest.raises(RecipeError, match=r"^datasets\[1\]: name ./nope/x.jsonl: no such file or folder"):
        check_sources(load_recipe_dict({"datasets": [{"name": alpaca}, {"name": "./nope/x.jsonl"}]}))
    with pytest.raises(RecipeError, match=r"^datasets\[0\]: split: 'test' is not a split of .*alpaca_en_demo.json"):
        check_sources(load_recipe_dict({"datasets": [{"name": alpaca, "split": "test"}]}))
