"""merge and generate on tiny models with adapters built in-process (random, non-zero B: no training needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_lora_recipe.model.loading import quantization_config
from hf_lora_recipe.recipe.schema import Recipe
from hf_lora_recipe.shipping.merging import merge

from .conftest import CLI, run_cli
from .fixtures import build_adapter_dir


NF4 = quantization_config(Recipe())  # the seed's, as training loads the base


@pytest.fixture(scope="module")
def qlora_adapter(tiny_base, tmp_path_factory):
    return build_adapter_dir(tiny_base, tmp_path_factory.mktemp("qlora") / "adapter", load_in_4bit=True)


@pytest.fixture(scope="module")
def lora_adapter(tiny_base, tmp_path_factory):
    return build_adapter_dir(tiny_base, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randint(3, 32000, (2, 40))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=inputs).logits.float()


def test_lora_merge_equals_the_adapter_in_fp32(lora_adapter, tiny_base, inputs, tmp_path):
    merged_dir = merge(str(lora_adapter), tmp_path / "merged", dtype="float32")
    adapter_logits = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), lora_adapter), inputs
    )
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), inputs)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged_dir), inputs)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    tensors = {}
    for shard in merged_dir.glob("*.safetensors"):
        tensors.update(load_file(shard))
    assert tensors and not [name for name in tensors if "lora_" in name]
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert json.loads((merged_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    reloaded = AutoTokenizer.from_pretrained(merged_dir)
    assert (
        reloaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "<s>[INST] hi [/INST]"
    )


def test_qlora_merge_into_dequantized_nf4_is_what_was_trained(qlora_adapter, tiny_base, inputs, tmp_path):
    trained = _logits(
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=NF4, dtype=torch.bfloat16),
            qlora_adapter,
        ),
        inputs,
    )
    dequantized = merge(str(qlora_adapter), tmp_path / "dequantized", dtype="float32")  # the default for QLoRA
    original = merge(str(qlora_adapter), tmp_path / "original", dtype="float32", merge_into="original")
    diff_dequantized = (
        (_logits(AutoModelForCausalLM.from_pretrained(dequantized), inputs) - trained).abs().max().item()
    )
    diff_original = (_logits(AutoModelForCausalLM.from_pretrained(original), inputs) - trained).abs().max().item()
    print(
        f"\nmax |logit diff| vs adapter on NF4 base: dequantized {diff_dequantized:.4f}, original {diff_original:.4f}"
    )
    assert diff_dequantized < 2e-2  # bf16 compute in the NF4 reference
    assert diff_dequantized * 4 < diff_original
    assert "dequantized NF4 weights" in (dequantized / "README.md").read_text()
    # --dtype float32 means the whole checkpoint, embeddings and norms too, and config.json says so
    from safetensors import safe_open

    with safe_open(str(dequantized / "model.safetensors"), framework="pt") as tensors:
        assert {tensors.get_tensor(name).dtype for name in tensors.keys()} == {torch.float32}
    assert json.loads((dequantized / "config.json").read_text())["dtype"] == "float32"


def test_dequantized_merge_of_a_plain_lora_adapter_is_refused(lora_adapter, tmp_path):
    result = run_cli(
        CLI, "merge", "--adapter", str(lora_adapter), "--output", str(tmp_path / "m"), "--merge_into", "dequantized"
    )
    assert result.returncode == 2 and "QLoRA" in result.stderr
    assert not (tmp_path / "m").exists()


def test_merge_output_appears_atomically(lora_adapter, tmp_path, monkeypatch):
    output = tmp_path / "merged"
    merge(str(lora_adapter), output, dtype="float32")
    before = (output / "model.safetensors").read_bytes()

    def crash(self, *args, **kwargs):
        (Path(args[0]) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        merge(str(lora_adapter), output, dtype="float32", overwrite=True)
    assert (output / "model.safetensors").read_bytes() == before  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # and no half-written directory is left
    with pytest.raises(RuntimeError):
        merge(str(lora_adapter), tmp_path / "fresh", dtype="float32")
    assert not (tmp_path / "fresh").exists()


def test_card_metadata_names_hub_ids_only():
    from hf_lora_recipe.recipe.schema import Recipe, recipe_to_dict
    from hf_lora_recipe.shipping.model_card import render_card

    card = render_card(recipe_to_dict(Recipe()), {}, "me/adapter")
    metadata = yaml.safe_load(re.match(r"^---\n(.*?)\n---", card, re.S).group(1))
    assert metadata["base_model"] == "meta-llama/Meta-Llama-3-8B" and metadata["datasets"] == ["tatsu-lab/alpaca"]
    assert 'adapter = "me/adapter"' in card


@pytest.mark.parametrize("kind", ["adapter", "merged"])
@pytest.mark.parametrize("base_unknown", [False, True])
def test_card_load_snippet_is_python_for_any_path(kind, base_unknown):
    """Quotes, backslashes, spaces, newlines-free odd names and non-ASCII: the snippet still compiles and names them."""
    import ast

    from hf_lora_recipe.recipe.schema import Recipe, recipe_to_dict
    from hf_lora_recipe.shipping.model_card import render_card

    location = '/tmp/it\'s "mine"/Ünïcode dir\\x'
    recipe = {**recipe_to_dict(Recipe()), "model_name_or_path": "bäse 'q' \"d\""}
    card = render_card(recipe, {}, location, kind, base_unknown=base_unknown)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    strings = [n.value for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert location in strings
    if kind == "adapter":
        assert (
            "path/to/your/copy/of/" + recipe["model_name_or_path"] if base_unknown else recipe["model_name_or_path"]
        ) in strings


@pytest.fixture(scope="module")
def scripted_model(llama2_tokenizer, tmp_path_factory):
    """A tiny Llama wired by hand: after ']' it says '▁Hello', after '▁Hello' it says EOS."""
    from hf_lora_recipe.devtools.tiny_llama import build_tiny_llama
    from hf_lora_recipe.templates.tokenizer import save_tokenizer

    directory = build_tiny_llama(llama2_tokenizer, tmp_path_factory.mktemp("scripted"))
    model = AutoModelForCausalLM.from_pretrained(directory)
    close_bracket = llama2_tokenizer.convert_tokens_to_ids("]")
    hello = llama2_tokenizer.convert_tokens_to_ids("▁Hello")
    with torch.no_grad():
        for layer in model.model.layers:  # layers add nothing: the last hidden state is the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.zero_()
        embeddings[:, 2] = 1.0
        embeddings[close_bracket] = torch.nn.functional.one_hot(torch.tensor(0), 64).float()
        embeddings[hello] = torch.nn.functional.one_hot(torch.tensor(1), 64).float()
        model.lm_head.weight.zero_()
        model.lm_head.weight[hello, 0] = 10.0
        model.lm_head.weight[2, 1] = 10.0  # EOS
    model.save_pretrained(directory)
    save_tokenizer(llama2_tokenizer, directory)
    return directory


def test_generate_streams_through_the_template_and_stops_at_eos(scripted_model, capsys):
    from hf_lora_recipe.commands.generate import main as generate_main

    assert generate_main(["--model", str(scripted_model), "--prompt", "Say hello", "--max_new_tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == "Hello"  # one token, then EOS ended it long before 20 tokens


def test_generate_with_an_adapter(scripted_model, tmp_path, capsys):
    from peft import get_peft_model

    from hf_lora_recipe.commands.generate import main as generate_main
    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.architecture import with_projections
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer, save_tokenizer

    adapter_dir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(scripted_model)
    model = get_peft_model(base, lora_config(with_projections(Recipe(), base)))
    model.save_pretrained(adapter_dir)  # B = 0: the adapter model behaves exactly like the scripted base
    save_tokenizer(load_tokenizer(str(scripted_model)), adapter_dir)
    assert generate_main(["--adapter", str(adapter_dir), "--prompt", "Say hello", "--max_new_tokens", "20"]) == 0
    assert capsys.readouterr().out.strip() == "Hello"
