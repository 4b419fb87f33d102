"""Base model (NF4 or not) and the LoRA adapter on it."""

from __future__ import annotations

import functools
import os
from typing import Any

from . import log
from .config import Recipe, peft_target_modules


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)  # names are checked against the recipe's choices when it loads


def lora_config(recipe: Recipe) -> Any:
    """The recipe's LoraConfig. Only the named projections get adapters: never embeddings, norms or the LM head."""
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=peft_target_modules(recipe),
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_kwargs(recipe: Recipe) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` arguments for the recipe's base, dtypes by name; None for an unquantized base.

    The one place the quantization is spelled out: training, merge, generate and the model card's load
    snippet all read it from the run's recipe, so they load the base exactly as training did.
    """
    if not recipe.load_in_4bit:
        return None
    return dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=recipe.bnb_4bit_compute_dtype,
        # Storage in the compute dtype makes the packed NF4 weights shardable by FSDP like any bf16 tensor.
        bnb_4bit_quant_storage=recipe.bnb_4bit_quant_storage,
    )


def quantization_config(recipe: Recipe) -> Any | None:
    kwargs = quantization_kwargs(recipe)
    if kwargs is None:
        return None
    from transformers import BitsAndBytesConfig

    dtypes = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    return BitsAndBytesConfig(**{k: torch_dtype(v) if k in dtypes else v for k, v in kwargs.items()})


@functools.lru_cache(maxsize=None)  # decide (and say why) once per run
def available_attention(requested: str) -> str:
    """The attention implementation to use: flash-attention only when its package is installed."""
    import importlib.util

    if requested.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        log.warn(f"attn_implementation {requested} asked for but flash-attn is not installed: using sdpa")
        return "sdpa"
    return requested


@functools.lru_cache(maxsize=None)
def liger_active(requested: bool) -> bool:
    """Liger's kernels are Triton, so CUDA only; off (with a reason) when not installed or not usable."""
    import importlib.util

    import torch

    if not requested:
        return False
    if importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available():
        log.warn("use_liger_kernel asked for but liger-kernel is not installed or there is no CUDA device: off")
        return False
    return True


def load_base_model(recipe: Recipe) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        revision=recipe.model_revision,
        trust_remote_code=recipe.trust_remote_code,
        attn_implementation=available_attention(recipe.attn_implementation),
        dtype=torch.bfloat16 if recipe.bf16 else torch.float32,
    )
    quant = quantization_config(recipe)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            # Each process quantizes onto its own GPU; bitsandbytes otherwise picks cuda:0 for every rank.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def sharded_by_fsdp() -> bool:
    """Set by ``accelerate launch`` with an FSDP config."""
    return _env_flag("ACCELERATE_USE_FSDP")


def fsdp_checkpoints_activations() -> bool:
    """FSDP's own activation checkpointing is on: the trainer's would conflict with it."""
    return _env_flag("FSDP_ACTIVATION_CHECKPOINTING")


def prepare_base(model: Any, recipe: Recipe) -> Any:
    """Freeze the base and set up (non-reentrant) checkpointing.

    With ``kbit_upcast_fp32`` a QLoRA base goes through PEFT's k-bit preparation, which also casts the parts
    bitsandbytes leaves unquantized (norms, embeddings, LM head) to fp32. By default they stay bf16, as
    loaded: the adapter trains against the base as stored, 2.75 GiB lighter on Llama-3-8B. Under FSDP they
    always stay bf16: FSDP flattens each wrapped layer into one tensor of one dtype.
    """
    from peft import prepare_model_for_kbit_training

    checkpointing_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks LoRA under DDP
    checkpointing = recipe.gradient_checkpointing and not fsdp_checkpoints_activations()
    if getattr(model, "is_loaded_in_4bit", False) and not sharded_by_fsdp() and recipe.kbit_upcast_fp32:
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    model.requires_grad_(False)
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        model.enable_input_require_grads()
    return model


def add_adapter(model: Any, recipe: Recipe) -> Any:
    """Attach LoRA to a prepared base (see :func:`prepare_base`)."""
    from peft import get_peft_model

    return get_peft_model(prepare_base(model, recipe), lora_config(recipe))


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) with 4-bit packed weights counted as the parameters they stand for."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes packs several 4-bit values per element
        count = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def trainable_line(trainable: int, total: int) -> str:
    """``trainable: 41.9M / 8030.3M (0.52%)``: the adapter against the base it adapts (total minus adapter)."""
    base = total - trainable
    return f"trainable: {_count(trainable)} / {_count(base)} ({trainable / base:.2%})"


def meta_lora_counts(config_path: str, recipe: Recipe) -> tuple[int, int]:
    """Exact (trainable, total) for a base architecture from its config.json alone, with no weights."""
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path, trust_remote_code=recipe.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, lora_config(recipe))
    return count_parameters(model)
