"""Tiny random bases of each supported architecture family, built from transformers' own default config of that
family with every size shrunk: for the family matrix (tests/test_families.py) and the support table
(docs/architectures.md). No download; the tokenizer given is saved beside the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any


# family -> transformers model_type; the family's instruct format is in templates/ (docs/architectures.md)
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "gpt_neox": "gpt_neox",
    "olmo2": "olmo2",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
}

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "sliding_window": 64,
}


def tiny_config(model_type: str, tokenizer: Any) -> Any:
    """transformers' default config of ``model_type``, every size it has shrunk to :data:`TINY`, sized for
    ``tokenizer`` and carrying its special tokens."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding/full) for the layers kept
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config


def build_tiny_family(family: str, tokenizer: Any, output_dir: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny base of ``family`` (a key of :data:`FAMILIES`) next to ``tokenizer``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(FAMILIES[family], tokenizer))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
