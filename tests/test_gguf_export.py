"""``hf-lora-recipe export --format gguf``: refusals in one line (fast, no llama.cpp needed), and the SmolLM2 adapter
run by llama.cpp itself on the Q4_1 base GGUF, reproducing transformers + PEFT (slow: needs ``make gguf``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from hf_lora_recipe.shipping.gguf_export import EXPORT_MARKER, _rescaled_adapter

from .conftest import CLI, PYTHON, run_cli
from .fixtures import build_adapter_dir


ERROR = "hf-lora-recipe: error:"


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    return build_adapter_dir(tiny_base, tmp_path_factory.mktemp("adapter") / "run")


def _edited(adapter: Path, tmp_path: Path, **config) -> Path:
    copy = Path(shutil.copytree(adapter, tmp_path / "edited", ignore=shutil.ignore_patterns("checkpoint-*")))
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return copy


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith(ERROR), result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "fully trained modules (lm_head)"),
        ({"alpha_pattern": {"q_proj": 8}}, "per-module alphas"),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 4}}, "rsLoRA with per-module ranks"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "3-D expert parameters"),
    ],
)
def test_what_llama_cpp_cannot_hold_is_refused_in_one_line(adapter, tmp_path, config, named):
    edited = _edited(adapter, tmp_path, **config)
    line = _one_line(run_cli(CLI, "export", "--adapter", str(edited), "--output", str(tmp_path / "out")))
    assert named in line and "--merged" in line
    assert not (tmp_path / "out").exists()


def test_an_output_folder_holding_other_files_is_refused_and_kept(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _one_line(run_cli(CLI, "export", "--adapter", str(adapter), "--output", str(out)))
    assert "not a GGUF export written by hf-lora-recipe" in line and "notes.txt" in line
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]


def test_missing_converters_say_how_to_get_them(adapter, tmp_path):
    env = {"HF_LORA_RECIPE_CACHE": str(tmp_path / "cache"), "LLAMA_CPP_DIR": ""}
    result = run_cli(CLI, "export", "--adapter", str(adapter), "--output", str(tmp_path / "out"), env=env)
    line = _one_line(result)
    assert "no llama.cpp converters" in line and "--fetch_converters" in line and "--llama_cpp DIR" in line


def test_verify_without_llama_cpp_is_one_line(adapter, tmp_path):
    # llama-cpp-python absent (as in a plain install): the import system is told it does not exist
    script = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from hf_lora_recipe.cli import main\n"
        f"sys.exit(main(['export', '--adapter', {str(adapter)!r}, '--output', {str(tmp_path / 'out')!r}, '--verify']))"
    )
    line = _one_line(run_cli(PYTHON, "-c", script))
    assert "--verify needs llama-cpp-python" in line and "hf-lora-recipe[gguf]" in line


def test_a_base_gguf_that_is_not_gguf_is_refused(adapter, tmp_path):
    fake = tmp_path / "base.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    line = _one_line(
        run_cli(CLI, "export", "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--base_gguf", str(fake))
    )
    assert "is not a GGUF file" in line


def test_rslora_scale_is_written_as_the_alpha_llama_cpp_divides_by_r(adapter, tmp_path):
    config = {**json.loads((adapter / "adapter_config.json").read_text()), "use_rslora": True}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rescaled = json.loads((_rescaled_adapter(adapter, config, scratch) / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    # PEFT's rsLoRA scale alpha/sqrt(r) equals llama.cpp's alpha'/r
    assert math.isclose(rescaled["lora_alpha"] / rank, alpha / math.sqrt(rank)) and not rescaled["use_rslora"]


# ---------------------------------------------------------------------------------------------- llama.cpp itself


def gguf_tools() -> None:
    """llama-cpp-python and the converters, as ``make gguf`` installs them: missing is a failure in CI."""
    from hf_lora_recipe.shipping.gguf_export import cached_converters

    missing = []
    if importlib.util.find_spec("llama_cpp") is None:
        missing.append("llama-cpp-python")
    if not (cached_converters() / "convert_lora_to_gguf.py").is_file():
        missing.append(f"llama.cpp's converters in {cached_converters()}")
    if missing:
        message = f"{' and '.join(missing)} not installed: run `make gguf`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def smollm2_run(smollm2_base, tmp_path_factory) -> Path:
    """A few QLoRA steps of the demo's review-sentiment task on SmolLM2 (~60 s): an adapter that changes replies."""
    gguf_tools()
    import torch

    from hf_lora_recipe.devtools.demo import make_dataset
    from hf_lora_recipe.pipeline.train_run import run
    from hf_lora_recipe.recipe.schema import Recipe

    tmp = tmp_path_factory.mktemp("smollm2-gguf")
    train_rows, held_out = make_dataset(num_train=16, num_eval=8, seed=0)
    (tmp / "data").mkdir()
    (tmp / "data" / "train.json").write_text(json.dumps(train_rows))
    (tmp / "data" / "test.json").write_text(json.dumps(held_out))
    recipe = Recipe(
        model_name_or_path=str(smollm2_base),
        chat_template="native",
        dataset_name=str(tmp / "data"),
        dataset_test_split="test",
        max_length=64,
        global_batch_size=4,
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=100,
        eval_steps=100,
        final_eval_examples=0,
        bnb_4bit_compute_dtype="float32",
        bf16=False,
        gradient_checkpointing=False,
        output_dir=str(tmp / "run"),
    )
    threads = torch.get_num_threads()
    try:
        return run(recipe)
    finally:
        torch.set_num_threads(threads)


def _q4_1_base() -> Path:
    from hf_lora_recipe.devtools.real_base import SMOLLM2, locate_gguf

    return locate_gguf(SMOLLM2)


@pytest.mark.slow
def test_llama_cpp_reproduces_the_smollm2_adapter_on_the_q4_1_base(smollm2_run, tmp_path):
    from hf_lora_recipe.upstream.gguf import read_metadata

    out = tmp_path / "export"
    result = run_cli(
        CLI, "export", "--adapter", str(smollm2_run), "--output", str(out), "--base_gguf", str(_q4_1_base())
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)  # the agreement table, for RESULTS.md
    assert "export vs adapter" in result.stdout
    agreement = json.loads((out / "gguf_agreement.json").read_text())
    n = len(agreement["prompts"])
    assert n == 8 and agreement["problems"] == []
    # the held-out reviews: llama.cpp gives the adapter's greedy replies, token for token
    assert sum(agreement["export"]["replies_equal"]) == n and sum(agreement["export"]["top1"]) == n
    assert set(agreement["export"]["replies"]) <= {"positive", "negative"}
    # and the adapter matters: it moves the logits far more than llama.cpp's base differs from ours
    assert agreement["adapter_effect"] > 4 * agreement["floor"]["mean_max_diff"]

    metadata = read_metadata(out / "adapter-f16.gguf")
    tokenizer_config = json.loads((smollm2_run / "tokenizer_config.json").read_text())
    assert metadata["general.type"] == "adapter" and metadata["adapter.lora.alpha"] == 32.0
    assert metadata["tokenizer.chat_template"] == (
        tokenizer_config.get("chat_template") or (smollm2_run / "chat_template.jinja").read_text()
    )
    assert metadata["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == [f"FROM {_q4_1_base()}", "ADAPTER ./adapter-f16.gguf"]
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert set(marker["files"]) == {"adapter-f16.gguf", "Modelfile", "gguf_agreement.json"}

    again = run_cli(CLI, "export", "--adapter", str(smollm2_run), "--output", str(out), "--verify", "false")
    assert "already holds a GGUF export" in _one_line(again)


@pytest.mark.slow
def test_the_merged_gguf_reproduces_the_adapter(smollm2_run, tmp_path):
    out = tmp_path / "merged"
    result = run_cli(CLI, "export", "--adapter", str(smollm2_run), "--output", str(out), "--merged", "--quant", "q8_0")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    agreement = json.loads((out / "gguf_agreement.json").read_text())
    assert agreement["problems"] == [] and sum(agreement["export"]["replies_equal"]) == len(agreement["prompts"])
    assert sorted(os.listdir(out)) == [EXPORT_MARKER, "Modelfile", "gguf_agreement.json", "model-q8_0.gguf"]
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf\nTEMPLATE")


@pytest.mark.slow
def test_an_architecture_llama_cpp_cannot_convert_is_refused(tiny_base, tmp_path):
    gguf_tools()
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["NotARealForCausalLM"]}))
    adapter = build_adapter_dir(tiny_base, tmp_path / "run")
    line = _one_line(
        run_cli(CLI, "export", "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--base", str(base))
    )
    assert "NotARealForCausalLM" in line and "cannot write as GGUF" in line


@pytest.mark.slow
def test_the_architecture_scan_matches_the_converters_registry():
    """upstream/llama_cpp.supported_architectures reads the registrations as text: it must find what importing
    the converter registers (a change in how llama.cpp registers models fails here, not silently)."""
    gguf_tools()
    from hf_lora_recipe.shipping.gguf_export import cached_converters
    from hf_lora_recipe.upstream.llama_cpp import supported_architectures

    converters = cached_converters()
    script = (
        f"import sys; sys.path[:0] = [{str(converters)!r}, {str(converters / 'gguf-py')!r}]\n"
        "from conversion import ModelBase, ModelType\n"
        "import conversion, importlib, pkgutil\n"
        "for m in pkgutil.iter_modules(conversion.__path__): importlib.import_module('conversion.' + m.name)\n"
        "print('\\n'.join(sorted(ModelBase._model_classes[ModelType.TEXT])))"
    )
    result = run_cli(PYTHON, "-c", script)
    assert result.returncode == 0, result.stderr
    registered = set(result.stdout.split())
    scanned = supported_architectures(converters)
    assert "LlamaForCausalLM" in registered and registered <= scanned
