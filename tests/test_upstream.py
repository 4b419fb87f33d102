"""Every reach into a private upstream symbol (``hf_lora_recipe/upstream/``) still finds what it reaches for.

One test per reach: when an upstream release moves or changes a symbol, the test names it, instead of the reach
turning into a silent no-op. A reach used by a whole code path is also exercised by that path's tests.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from .conftest import REPO_ROOT
from .test_gguf_export import gguf_tools


# --- torch


def test_torch_module_compile_routes_the_call_through_compiled_call_impl():
    from hf_lora_recipe.upstream import torch as reach

    layer = torch.nn.Linear(2, 2)
    assert reach.compiled_call(layer) is None
    assert reach.module_call(layer).__func__ is torch.nn.Module._call_impl
    calls = []
    reach.set_compiled_call(layer, lambda *args, **kwargs: calls.append(args) or reach.module_call(layer)(*args))
    layer(torch.ones(1, 2))
    assert len(calls) == 1  # Module.__call__ took the compiled call


def test_torch_scales_by_a_bool_mask_as_dropouts_gradient_does():
    from hf_lora_recipe.upstream import torch as reach

    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    assert torch.equal(reach.scale_by_mask(values, keep, 1 / 0.7), values * keep * (1 / 0.7))


def test_torch_dynamo_switch_and_counters():
    from hf_lora_recipe.upstream import torch as reach

    with reach.checkpoint_side_effects_allowed():
        assert torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint is True
    before = reach.graphs_compiled()
    torch.compile(lambda x: x * 3 + 1, fullgraph=True, backend="eager")(torch.ones(3))
    assert reach.graphs_compiled() == before + 1
    with reach.fresh_dynamo_counters():
        assert reach.graphs_compiled() == 0
    assert reach.graphs_compiled() == before + 1


def test_torch_fullgraph_failure_is_a_compile_error():
    from hf_lora_recipe.upstream import torch as reach

    def breaks(x):
        torch._dynamo.graph_break()
        return x + 1

    with pytest.raises(reach.COMPILE_ERRORS):
        torch.compile(breaks, fullgraph=True, backend="eager")(torch.ones(2))


def test_torch_forward_hooks_can_be_removed_by_kind():
    from hf_lora_recipe.upstream import torch as reach

    class Mine:
        def __call__(self, module, args, output):
            return output * 0

    layer = torch.nn.Linear(2, 2)
    layer.register_forward_hook(Mine())
    layer.register_forward_hook(lambda module, args, output: None)
    assert len(reach.remove_forward_hooks(layer, Mine)) == 1
    assert layer(torch.ones(1, 2)).abs().sum() > 0  # Mine (which zeroes) is gone, the other hook stays
    assert len(layer._forward_hooks) == 1


# --- transformers


def test_transformers_attention_implementation_is_what_from_pretrained_resolved(tiny_base):
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.upstream.transformers import attention_implementation

    for name in ("sdpa", "eager"):
        assert (
            attention_implementation(AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=name)) == name
        )


def test_transformers_attention_registry_lists_the_kernels_from_pretrained_accepts(tiny_base):
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.upstream.transformers import registered_attention

    names = registered_attention()
    assert {"eager", "sdpa", "flex_attention", "flash_attention_2"} <= names
    AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa")
    with pytest.raises(ValueError):  # what the registry leaves out, from_pretrained refuses
        AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpaa")


def test_transformers_says_which_classes_run_sdpa(llama2_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.devtools.tiny_families import build_tiny_family
    from hf_lora_recipe.upstream.transformers import supports_sdpa

    for family, runs in (("llama", True), ("gemma2", False)):
        base = build_tiny_family(family, llama2_tokenizer, tmp_path / family)
        model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
        assert supports_sdpa(model) is runs
        if not runs:  # what the flag stands for: from_pretrained refuses sdpa on this class
            with pytest.raises(ValueError, match="scaled_dot_product_attention"):
                AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")


def test_tokenizers_io_failure_is_a_bare_exception_naming_the_os_error(tmp_path):
    from tokenizers import Tokenizer, models

    from hf_lora_recipe.upstream.transformers import tokenizers_os_error

    with pytest.raises(Exception) as raised:  # noqa: PT011 - the bare Exception is what is checked
        Tokenizer(models.BPE()).save(str(tmp_path / "missing" / "tokenizer.json"))
    error = tokenizers_os_error(raised.value, "tokenizer.json")
    assert isinstance(error, OSError) and error.errno == 2 and error.filename == "tokenizer.json"
    assert tokenizers_os_error(ValueError("x (os error 2)"), "f") is None


def test_transformers_trainer_save_checkpoint_hook_and_output_dir():
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]


@pytest.mark.parametrize(
    "config, check",
    [
        ({"model_type": "no-such-architecture"}, "names_unknown_architecture"),
        ({"hidden_size": 8}, "names_no_model_type"),
    ],
)
def test_transformers_autoconfig_messages_we_read(tmp_path, config, check):
    from transformers import AutoConfig

    from hf_lora_recipe.upstream import transformers as reach

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as caught:
        AutoConfig.from_pretrained(tmp_path)
    assert getattr(reach, check)(caught.value), str(caught.value)
    if check == "names_unknown_architecture":
        assert reach.named_model_type(caught.value) == "no-such-architecture"


# --- TRL


def test_trl_use_triton_switch_and_train_metrics():
    import trl.trainer.utils as trl_utils
    from trl import SFTTrainer

    from hf_lora_recipe.upstream.trl import score_every_position

    original = trl_utils._use_triton
    try:
        score_every_position()
        assert trl_utils._use_triton(torch.device("cpu")) is False
    finally:
        trl_utils._use_triton = original
    source = __import__("inspect").getsource(SFTTrainer)
    assert 'self._metrics["train"]' in source or "self._metrics[mode]" in source


# --- accelerate


def test_accelerate_shared_state_and_prepared_dataloaders():
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    from hf_lora_recipe.upstream.accelerate import forget_dataloader

    assert "fsdp_plugin" in __import__("inspect").signature(AcceleratorState.__init__).parameters
    accelerator = Accelerator(cpu=True)
    assert PartialState._shared_state["distributed_type"] == accelerator.distributed_type
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(4)), batch_size=2))
    assert any(entry is loader for entry in accelerator._dataloaders)
    forget_dataloader(accelerator, loader)
    assert not any(entry is loader for entry in accelerator._dataloaders)


# --- PEFT


def test_accelerate_launch_environment_from_a_config_file():
    from hf_lora_recipe.upstream.accelerate import launch_environment

    configs = REPO_ROOT / "accelerate_configs"
    fsdp, processes = launch_environment(str(configs / "fsdp_lora.yaml"), 2)
    assert processes == 2 and fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    assert fsdp["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    zero3, processes = launch_environment(str(configs / "deepspeed_zero3.yaml"), None)
    assert zero3 == {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"} and processes == 8
    assert launch_environment(str(configs / "cpu_ddp.yaml"), None)[1] == 2
    assert launch_environment(str(configs / "single_gpu.yaml"), None) == ({}, 1)


def test_peft_eva_hook_classes():
    from peft.tuners.lora.eva import SVDHook, _Hook

    assert issubclass(SVDHook, _Hook)


# --- datasets


def test_datasets_fingerprint_tables_and_split_error(tmp_path):
    import datasets
    import pyarrow as pa

    from hf_lora_recipe.upstream import datasets as reach

    table = pa.table({"a": [1, 2]})
    in_memory = reach.in_memory_dataset(table, "f" * 32)
    assert reach.fingerprint(in_memory) == "f" * 32 and in_memory["a"] == [1, 2]
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert reach.memory_mapped_dataset(str(path), "e" * 32)["a"] == [1, 2]
    (tmp_path / "rows.json").write_text(json.dumps([{"a": 1}]))
    with pytest.raises(ValueError) as caught:
        datasets.load_dataset("json", data_files=str(tmp_path / "rows.json"), split="no_such_split")
    assert reach.is_unknown_split_error(caught.value)


# --- argparse


def test_argparse_lists_every_long_flag_including_groups():
    from hf_lora_recipe.upstream.argparse import long_flags

    parser = argparse.ArgumentParser()
    parser.add_argument("--top")
    parser.add_argument_group("group").add_argument("--inside", "-i")
    assert set(long_flags(parser)) == {"--help", "--top", "--inside"}


def test_gguf_new_metadata_copies_a_file_with_keys_added(tmp_path):
    import gguf
    import numpy as np

    from hf_lora_recipe.upstream.gguf import add_metadata, read_metadata

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("general.name", "tiny")
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    add_metadata(path, {"tokenizer.chat_template": "{{ x }}", "tokenizer.ggml.eot_token_id": 7}, scratch)
    metadata = read_metadata(path)
    assert metadata["general.name"] == "tiny" and metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.chat_template"] == "{{ x }}" and metadata["tokenizer.ggml.eot_token_id"] == 7
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    assert tensor.name == "blk.0.attn_q.weight.lora_a" and tensor.data.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_llama_cpp_keeps_the_logits_of_every_evaluated_position():
    from hf_lora_recipe.devtools.real_base import SMOLLM2, locate_gguf
    from hf_lora_recipe.upstream.llama_cpp import greedy, loaded, logits

    gguf_tools()
    ids = [
        1,
        4093,
        198,
        28120,
        2,
        198,
        1,
        520,
        9531,
        198,
    ]  # <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n
    with loaded(locate_gguf(SMOLLM2), None, 64) as llm:
        last = logits(llm, ids)
        assert llm.n_tokens == len(ids) and last.shape == (llm.n_vocab(),)
        reply = greedy(llm, ids, {2}, 4)
        assert len(reply) == 4 and reply[0] == int(last.argmax())
