"""Liger kernels (``use_liger_kernel``, the ``[fast]`` extra) leave PEFT's LoRA projections and dropout in the path.

How the stack applies Liger, which these tests follow call for call:

* ``Trainer.train`` calls ``transformers.integrations.liger.apply_liger_kernel(self.model,
  args.liger_kernel_config)``, which unwraps the PeftModel (``get_base_model()``: the ``LlamaForCausalLM`` that
  holds the LoRA layers) and hands it to ``liger_kernel.transformers._apply_liger_kernel_to_instance``.
* TRL's SFTTrainer forces ``liger_kernel_config["fused_linear_cross_entropy"] = False`` (Liger's fused loss would
  replace ``model.forward``, where TRL's own fused LM head lives), so for Llama Liger swaps only RoPE, RMSNorm
  and the SwiGLU MLP's forward - each bound onto the existing module objects, the LoRA-wrapped nn.Linears
  untouched.

Liger's kernels are Triton and there is no GPU here (on a CPU they fail with "0 active drivers"), so each test
swaps the three Triton-backed functions the patched forwards call (``LigerRMSNormFunction``,
``LigerSiLUMulFunction`` and RoPE's ``dispatch``) for pure-torch equivalents that also count their calls: what
runs is Liger's own patched module forwards, with only the innermost kernels replaced. Liger also rebinds
module globals of ``transformers.models.llama.modeling_llama`` for the whole process; every test restores them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


# ~25 s and the [fast] extra's 1 GB of triton: CI runs them with the slow tests (make test-slow installs it)
pytestmark = pytest.mark.slow

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = 2
DROPOUT = 0.1
# What TRL's SFTTrainer turns liger_kernel_config into (sft_trainer.py: "only its layer kernels are applied").
TRL_LIGER_CONFIG = {"fused_linear_cross_entropy": False}


@pytest.fixture(scope="module")
def liger(pytestconfig):
    """liger_kernel's transformers integration, imported (and timed) here rather than at collection, so a run
    without the [fast] extra skips these tests and any run pays the import only when they are selected."""
    start = time.perf_counter()
    try:
        import liger_kernel.transformers  # noqa: F401
        import liger_kernel.transformers.monkey_patch as monkey_patch
        from liger_kernel.transformers import rms_norm, rope, swiglu
        from liger_kernel.transformers.model.llama import lce_forward
    except Exception as error:  # ImportError, or triton / a transformers version liger refuses
        message = (
            f"liger-kernel is not importable ({type(error).__name__}: {error}); "
            "pip install 'hf-lora-recipe[fast]' to run these tests (make test-slow does)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    seconds = time.perf_counter() - start
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # no terminal under xdist workers
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            reporter.write_line(f"liger-kernel {_version('liger-kernel')} import: {seconds:.1f} s")
    return SimpleNamespace(
        monkey_patch=monkey_patch,
        rms_norm=rms_norm,
        rope=rope,
        swiglu=swiglu,
        lce_forward=lce_forward,
        import_s=seconds,
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


@pytest.fixture
def torch_ops(liger, monkeypatch):
    """Restore what Liger rebinds process-wide, and run its Triton kernels as counted pure-torch equivalents."""
    import transformers.loss.loss_utils as loss_utils
    from transformers.models.llama import modeling_llama

    original_rope = modeling_llama.apply_rotary_pos_emb
    assert original_rope is not liger.rope.liger_rotary_pos_emb, "an earlier test leaked Liger's RoPE"
    # Liger assigns these module globals (apply_liger_kernel_to_llama); monkeypatch puts the originals back.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    monkeypatch.setattr(loss_utils.nn.functional, "cross_entropy", loss_utils.nn.functional.cross_entropy)

    calls: Counter[str] = Counter()

    def rms_norm(x, weight, eps, offset, casting_mode, in_place, row_mode):
        assert casting_mode == "llama"  # Llama's: normalise in fp32, scale by the weight in the input dtype
        calls["rms_norm"] += 1
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (offset + weight) * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)

    def silu_mul(a, b, gate_multiplier=1.0, down_multiplier=1.0):
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a * gate_multiplier) * b * down_multiplier

    def dispatch(op, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **kwargs):
        assert op == "rope" and not kwargs
        calls["rope"] += 1
        return original_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(liger.rms_norm, "LigerRMSNormFunction", SimpleNamespace(apply=rms_norm))
    monkeypatch.setattr(liger.swiglu, "LigerSiLUMulFunction", SimpleNamespace(apply=silu_mul))
    monkeypatch.setattr(liger.rope, "dispatch", dispatch)
    return calls


def _lora_llama(quantized_in: Path | None = None):
    """A PeftModel around a tiny LlamaForCausalLM, LoRA (the recipe's LoraConfig) on all seven projections with
    dropout; B is random (init_lora_weights=False) so the adapters change the output. With ``quantized_in`` the
    base is saved there and reloaded as QLoRA loads it (the recipe's BitsAndBytesConfig: NF4 Linear4bit, bf16)."""
    import dataclasses

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.architecture import with_projections
    from hf_lora_recipe.model.loading import quantization_config
    from hf_lora_recipe.recipe.schema import Recipe

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    recipe = Recipe(lora_target_modules=list(PROJECTIONS), lora_dropout=DROPOUT, load_in_4bit=True)
    base = LlamaForCausalLM(config)
    if quantized_in is not None:
        base.save_pretrained(quantized_in)
        base = AutoModelForCausalLM.from_pretrained(
            quantized_in, quantization_config=quantization_config(recipe), dtype=torch.bfloat16
        )
    base.requires_grad_(False)
    return get_peft_model(
        base, dataclasses.replace(lora_config(with_projections(recipe, base)), init_lora_weights=False)
    )


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS}
    assert len(layers) == LAYERS * len(PROJECTIONS)
    for name, module in layers.items():
        assert isinstance(module, LoraLayer), f"{name} is no longer a LoRA layer: {type(module).__name__}"
    return layers


def _apply_as_the_trainer_does(liger, model, monkeypatch) -> list:
    """Liger applied through the very function Trainer.train calls, with the config TRL passes it; returns the
    models transformers handed to liger's _apply_liger_kernel_to_instance."""
    import liger_kernel.transformers as package
    from transformers.integrations.liger import apply_liger_kernel

    received = []
    real = liger.monkey_patch._apply_liger_kernel_to_instance

    def recording(model, **kwargs):
        received.append((model, kwargs))
        return real(model=model, **kwargs)

    monkeypatch.setattr(package, "_apply_liger_kernel_to_instance", recording)
    apply_liger_kernel(model, dict(TRL_LIGER_CONFIG))
    return received


class _Calls:
    """Forward hooks counting the calls of every LoRA layer, its dropout and its A matrix."""

    def __init__(self, layers: dict[str, torch.nn.Module]):
        self.counts: Counter[str] = Counter()
        self.handles = []
        for name, layer in layers.items():
            for part, module in (
                ("layer", layer),
                ("dropout", layer.lora_dropout["default"]),
                ("lora_A", layer.lora_A["default"]),
            ):
                self.handles.append(module.register_forward_hook(self._count(f"{name}:{part}")))

    def _count(self, key: str):
        def hook(module, args, output):
            self.counts[key] += 1

        return hook

    def missing(self, layers) -> list[str]:
        return [
            f"{name}:{part}"
            for name in layers
            for part in ("layer", "dropout", "lora_A")
            if self.counts[f"{name}:{part}"] == 0
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_trainer_applies_liger_to_the_peft_base_model_and_keeps_every_lora_layer(liger, torch_ops, monkeypatch):
    from transformers.models.llama import modeling_llama

    model = _lora_llama()
    base = model.get_base_model()
    before = [(name, type(module), module) for name, module in model.named_modules()]
    trainable = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    layers = _lora_layers(model)

    received = _apply_as_the_trainer_does(liger, model, monkeypatch)

    # transformers unwrapped the PeftModel: liger patched the LlamaForCausalLM that holds the LoRA layers
    assert len(received) == 1
    assert received[0][0] is base and isinstance(base, modeling_llama.LlamaForCausalLM)
    assert received[0][1] == TRL_LIGER_CONFIG
    # ... and did patch it (else the checks below would hold vacuously): Liger's forwards are bound onto the
    # existing MLP and norm objects, RoPE is swapped module-wide, the model's forward is left alone (no FLCE)
    swiglu_forward, rms_forward = liger.swiglu.LigerSwiGLUMLP.forward, liger.rms_norm.LigerRMSNorm.forward
    for layer in base.model.layers:
        assert layer.mlp.forward.__func__ is swiglu_forward
        assert layer.input_layernorm.forward.__func__ is rms_forward
        assert layer.post_attention_layernorm.forward.__func__ is rms_forward
    assert base.model.norm.forward.__func__ is rms_forward
    assert modeling_llama.apply_rotary_pos_emb is liger.rope.liger_rotary_pos_emb
    assert "forward" not in vars(base) and "forward" not in vars(model)

    # every module is the same object of the same class as before; LoRA layers keep their forward and dropout
    assert [(name, type(module), module) for name, module in model.named_modules()] == before
    for name, layer in _lora_layers(model).items():
        assert layer is layers[name] and "forward" not in vars(layer)
        dropout = layer.lora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == DROPOUT and "forward" not in vars(dropout)
    assert sorted(name for name, param in model.named_parameters() if param.requires_grad) == trainable


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_liger_patched_forward_runs_every_lora_projection_and_its_dropout(
    liger, torch_ops, monkeypatch, tmp_path, base
):
    """On a plain base and on a bitsandbytes 4-bit one (QLoRA: peft's lora.bnb.Linear4bit around Linear4bit)."""
    model = _lora_llama(quantized_in=tmp_path / "base" if base == "nf4" else None)
    if base == "nf4":
        import bitsandbytes as bnb

        assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in _lora_layers(model).values())
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        with model.disable_adapter():
            without_lora = model(input_ids=input_ids).logits
    assert not torch.allclose(expected, without_lora, atol=1e-4)  # the adapters matter, so a bypass would show

    _apply_as_the_trainer_does(liger, model, monkeypatch)
    layers = _lora_layers(model)
    calls = _Calls(layers)
    with torch.no_grad():
        patched = model(input_ids=input_ids).logits
    # Liger's forwards ran (counted torch stand-ins of its kernels), and the output is the LoRA model's own
    assert torch_ops == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rope": LAYERS}
    torch.testing.assert_close(patched, expected, rtol=0, atol=0)  # same ops in the same order: bit-identical
    assert calls.missing(layers) == []

    # training mode: dropout active on each adapter's input, gradients reach every adapter through Liger's path
    model.train()
    calls.counts.clear()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    calls.remove()
    assert calls.missing(layers) == [] and set(calls.counts.values()) == {1}
    for name, layer in layers.items():
        for matrix in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            assert matrix.grad is not None and matrix.grad.abs().sum() > 0, f"{name}: no gradient"


def test_the_check_catches_an_mlp_forward_that_reads_projection_weights(liger, torch_ops, monkeypatch):
    """Negative control: were Liger's MLP forward to multiply by ``self.gate_proj.weight`` etc. itself (as fused
    MLP kernels do), the LoRA layers of the MLP would be skipped - and the hooks above would say so."""
    import torch.nn.functional as F

    def weight_reading_forward(self, x):
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(liger.swiglu._swiglu_dispatch(gate, up), self.down_proj.weight)

    monkeypatch.setattr(liger.swiglu.LigerSwiGLUMLP, "forward", weight_reading_forward)
    model = _lora_llama()
    _apply_as_the_trainer_does(liger, model, monkeypatch)
    layers = _lora_layers(model)
    calls = _Calls(layers)
    model(input_ids=torch.randint(0, 96, (1, 8)))
    calls.remove()
    skipped = {name.rsplit(".", 1)[-1] for name in calls.missing(layers)}
    assert skipped == {
        "gate_proj:layer",
        "gate_proj:dropout",
        "gate_proj:lora_A",
        "up_proj:layer",
        "up_proj:dropout",
        "up_proj:lora_A",
        "down_proj:layer",
        "down_proj:dropout",
        "down_proj:lora_A",
    }


@pytest.mark.filterwarnings("ignore:.*use_liger_kernel.*:FutureWarning")  # TRL 1.x deprecates the flag
@pytest.mark.parametrize("lm_head_loss", ["fused", "plain"])
def test_recipe_trainer_trains_every_adapter_through_liger(
    liger, torch_ops, monkeypatch, tiny_base, tmp_path, lm_head_loss
):
    """The recipe's own trainer, Liger on (as on a CUDA machine), one real optimizer step on the CPU: Trainer.train
    applies Liger, both loss paths run through Liger's layers, every LoRA B matrix is updated, and evaluation
    runs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    import hf_lora_recipe.training.trainer as recipe_trainer
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import attention_for
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    monkeypatch.setattr(recipe_trainer, "liger_active", lambda requested: requested)  # no CUDA here
    recipe = Recipe(
        model_name_or_path=str(tiny_base),
        load_in_4bit=False,
        bf16=False,
        use_liger_kernel=True,
        lm_head_loss=lm_head_loss,
        lora_target_modules=list(PROJECTIONS),
        lora_dropout=DROPOUT,
        max_steps=1,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_steps=100,
        report_to=["none"],
        output_dir=str(tmp_path / "run"),
    )
    base = AutoModelForCausalLM.from_pretrained(
        tiny_base, dtype=torch.float32, attn_implementation=attention_for(recipe)
    )  # the attention a run with this recipe loads, which the trainer checks
    model = add_adapter(base, recipe)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 1000, (16,), generator=generator).tolist() for _ in range(4)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": [[-100] * 8 + row[8:] for row in rows]})
    trainer = recipe_trainer.build_trainer(recipe, model, load_tokenizer(str(tiny_base)), dataset, dataset, 1, [])
    assert trainer.args.use_liger_kernel and trainer.args.liger_kernel_config == TRL_LIGER_CONFIG
    assert trainer.fused_loss == (lm_head_loss == "fused")

    layers = _lora_layers(model)
    b_before = {name: layer.lora_B["default"].weight.detach().clone() for name, layer in layers.items()}
    calls = _Calls(layers)
    trainer.train()
    calls.remove()

    assert torch_ops["rms_norm"] and torch_ops["swiglu"] and torch_ops["rope"]  # Trainer.train applied Liger
    assert calls.missing(layers) == []
    unchanged = [name for name, layer in layers.items() if torch.equal(layer.lora_B["default"].weight, b_before[name])]
    assert unchanged == []
    # Liger's fused linear cross-entropy stayed off: the base's forward is still TRL's fused-LM-head wrapper
    # around LlamaForCausalLM.forward, not liger's lce_forward
    forward = vars(model.get_base_model())["forward"].__func__
    assert forward is not liger.lce_forward and forward.__wrapped__ is LlamaForCausalLM.forward
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    # evaluation too: TRL's prediction_step (not Trainer's, which adds liger's `skip_logits` kwarg) under Liger
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))
