"""`preview` shows what the trainer consumes: its JSON equals the trainer's own dataloader batches."""

from __future__ import annotations

import json

import pytest
import torch

from hf_lora_recipe.commands.preview import main as preview_main
from hf_lora_recipe.data.pipeline import build_sft_dataset
from hf_lora_recipe.recipe.schema import Recipe
from hf_lora_recipe.templates.tokenizer import load_tokenizer

from .conftest import shared_asset


@pytest.fixture(scope="module")
def small_alpaca(tmp_path_factory):
    rows = json.loads(shared_asset("data/alpaca_en_demo.json").read_text())[:12]
    path = tmp_path_factory.mktemp("data") / "small.json"
    path.write_text(json.dumps(rows))
    return path


def test_preview_json_equals_the_trainers_dataloader(tiny_base, small_alpaca, tmp_path, capsys):
    assert (
        preview_main(
            [
                "--model_name_or_path",
                str(tiny_base),
                "--dataset_name",
                str(small_alpaca),
                "--max_length",
                "96",
                "--num_examples",
                "12",
                "--json",
            ]
        )
        == 0
    )
    previewed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(previewed) == 12 and all({"input_ids", "labels", "messages"} <= set(p) for p in previewed)

    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    recipe = Recipe(model_name_or_path=str(tiny_base), dataset_name=str(small_alpaca), max_length=96)
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_base),
        args=SFTConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to="none",
            max_length=96,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    seen = []
    for batch in trainer.get_train_dataloader():
        for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            keep = mask.bool()
            seen.append((input_ids[keep].tolist(), labels[keep].tolist()))
            assert torch.all(labels[~keep] == -100)  # padding is never trained
    assert sorted(seen) == sorted((p["input_ids"], p["labels"]) for p in previewed)


def test_preview_human_view_marks_trained_tokens(tiny_base, small_alpaca, capsys):
    assert (
        preview_main(
            ["--model_name_or_path", str(tiny_base), "--dataset_name", str(small_alpaca), "--num_examples", "2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("data: 12 examples in, 12 kept")
    assert out.count("--- example") == 2
    assert "<s> [INST]" in out and "</s>»" in out and "trained]" in out


def test_preview_needs_only_a_tokenizer_directory(small_alpaca, capsys):
    tokenizer_dir = shared_asset("tokenizers/gpt-neox-20b")  # no model weights, no config.json
    assert (
        preview_main(
            [
                "--model_name_or_path",
                str(tokenizer_dir),
                "--dataset_name",
                str(small_alpaca),
                "--num_examples",
                "1",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["labels"][-1] == 0  # <|endoftext|> is supervised


def test_preview_reports_a_bad_row(tmp_path, tiny_base, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "x", "input": "", "output": None}]))
    assert preview_main(["--model_name_or_path", str(tiny_base), "--dataset_name", str(path)]) == 2
    assert (
        "\nhf-lora-recipe: error: bad.json element 0 (0-based): field 'output' is missing or null"
        in capsys.readouterr().err
    )
