"""The recipe: one schema, one parser, one precedence.

Precedence, lowest to highest: the seed defaults below < the recipe YAML < ``--key value`` flags.
Field names follow TRL (``SFTConfig``, ``ModelConfig``, ``ScriptArguments``) wherever TRL has the concept,
so a TRL user reads a recipe without a glossary. This module imports nothing else of ours: everything
downstream reads a validated :class:`Recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

SEED_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATASET_FORMATS = ("alpaca", "oasst", "prompt_completion", "messages", "auto")


class RecipeError(ValueError):
    """A recipe that cannot run: raised before any model or dataset is loaded."""


@dataclass
class Recipe:
    """Every knob of a run. The defaults *are* the seed recipe; nothing else in the package restates them."""

    # --- Model
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B"
    model_revision: str = "main"
    trust_remote_code: bool = False  # executing a repo's Python is opt-in
    attn_implementation: str = "sdpa"
    # --- QLoRA: base weights in NF4, double-quantized, bf16 compute; bf16 storage lets FSDP shard them
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = True  # TRL's default is False; the seed double-quantizes (~0.4 bit/param saved)
    bnb_4bit_compute_dtype: str = "bfloat16"
    bnb_4bit_quant_storage: str = "bfloat16"
    # Keep the unquantized norms, embeddings and LM head in bf16. true = PEFT's k-bit preparation, which upcasts
    # them to fp32 (a guard for fp16 training): on an H200 that cost 2.75 GiB and 15% speed (benchmarks/RESULTS.md).
    kbit_upcast_fp32: bool = False
    # --- LoRA: W' = W0 + (alpha/r) B A, B = 0 at step 0
    lora_r: int = 16
    lora_alpha: int = 32  # 2r: alpha == r under-uses the adapter
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(SEED_TARGET_MODULES))
    # --- Data
    dataset_name: str = "tatsu-lab/alpaca"
    dataset_config: str | None = None
    dataset_revision: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str | None = None  # a named held-out split, for eval loss
    eval_split_size: float = 0.0  # or hold out this share (< 1) / count (>= 1) of the training rows
    dataset_format: str = "alpaca"
    on_bad_rows: str = "error"  # or "skip": drop and count rows with missing/null/empty fields
    oasst_languages: list[str] = field(default_factory=list)  # e.g. [en, de]; empty keeps every language
    oasst_all_paths: bool = False  # every root-to-leaf path instead of the best-ranked one
    max_length: int = 512
    padding_free: str = "auto"  # true/false; auto = on for CPU, and for GPUs with flash-attention (see README)
    train_sampling_strategy: str = "random"  # or group_by_length: similar lengths together, less padding
    use_liger_kernel: bool = False  # pip install hf-lora-recipe[fast]: Liger's RMSNorm/SwiGLU/RoPE kernels on CUDA
    lm_head_loss: str = "auto"  # fused (TRL's tiled kernel, no full logits) | plain; auto = fused on GPU only
    completion_only_loss: bool = True  # loss on responses + EOS only; false also trains on prompts (echoing)
    # --- Batch: the global batch is the recipe's; accumulation is derived from it and the world size
    global_batch_size: int = 128
    per_device_train_batch_size: int = 4
    # --- Optimisation
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "cosine"  # decays to 0 at the last step
    warmup_steps: float = 0.0  # < 1 is a fraction of the run (transformers 5); the seed has no warm-up
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    optim: str = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    # --- Output and logging
    output_dir: str = "outputs/run"
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or true (latest); by default resumes automatically
    overwrite_output_dir: bool = False  # start fresh even though output_dir holds checkpoints
    report_to: str = "none"
    push_to_hub: bool = False  # push the adapter (not checkpoints) when training ends
    hub_model_id: str | None = None
    hub_private_repo: bool = False


# Written to recipe.yaml under ``derived:`` for the record; re-derived (never read back) on the next run.
DERIVED_KEYS = ("gradient_accumulation_steps", "world_size")

FIELD_TYPES: dict[str, Any] = get_type_hints(Recipe)
FIELD_NAMES = [f.name for f in dataclasses.fields(Recipe)]


def _nearest(key: str) -> str:
    match = difflib.get_close_matches(key, FIELD_NAMES, n=1, cutoff=0.0)
    return match[0] if match else FIELD_NAMES[0]


def _unknown_key_error(key: str, where: str) -> RecipeError:
    if key in DERIVED_KEYS:
        return RecipeError(
            f"{key} ({where}) is derived, never typed: set global_batch_size and per_device_train_batch_size"
        )
    return RecipeError(f"unknown recipe key {key!r} ({where}); did you mean {_nearest(key)!r}?")


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's declared type."""
    hint = FIELD_TYPES[name]
    optional = type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise RecipeError(f"{name} must not be null")
    try:
        if get_origin(base) is list:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise RecipeError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)}")


def parse_cli_overrides(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--config PATH --key value --key=value ...`` -> (config path, overrides). No positional arguments."""
    config_path: str | None = None
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise RecipeError(f"unexpected argument {token!r}: recipe settings are given as --key value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise RecipeError(f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        elif key not in FIELD_TYPES:
            raise _unknown_key_error(key, "on the command line")
        else:
            overrides[key] = value
    return config_path, overrides


def load_recipe(config_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Seed defaults < YAML at ``config_path`` < ``overrides``; validated before anything heavy happens."""
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise RecipeError(f"recipe not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of key: value")
        loaded.pop("derived", None)
        for key in loaded:
            if key not in FIELD_TYPES:
                raise _unknown_key_error(str(key), f"in {path}")
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise _unknown_key_error(key, "in overrides")
        values[key] = value
    recipe = Recipe(**{key: _coerce(key, value) for key, value in values.items()})
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    if recipe.dataset_format not in DATASET_FORMATS:
        raise RecipeError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)}; got {recipe.dataset_format!r}")
    if recipe.padding_free not in ("auto", "true", "false"):
        raise RecipeError(f"padding_free must be auto, true or false; got {recipe.padding_free!r}")
    if recipe.train_sampling_strategy not in ("random", "sequential", "group_by_length"):
        raise RecipeError(f"train_sampling_strategy must be random, sequential or group_by_length; "
                          f"got {recipe.train_sampling_strategy!r}")
    if recipe.lm_head_loss not in ("auto", "fused", "plain"):
        raise RecipeError(f"lm_head_loss must be auto, fused or plain; got {recipe.lm_head_loss!r}")
    if recipe.on_bad_rows not in ("error", "skip"):
        raise RecipeError(f"on_bad_rows must be error or skip; got {recipe.on_bad_rows!r}")
    if recipe.eval_split_size < 0 or (recipe.eval_split_size and recipe.dataset_test_split):
        raise RecipeError("set either eval_split_size (>= 0) or dataset_test_split, not both")
    for name in ("lora_r", "lora_alpha", "global_batch_size", "per_device_train_batch_size", "max_length"):
        if getattr(recipe, name) <= 0:
            raise RecipeError(f"{name} must be positive; got {getattr(recipe, name)}")
    if not 0.0 <= recipe.lora_dropout < 1.0:
        raise RecipeError(f"lora_dropout must be in [0, 1); got {recipe.lora_dropout}")
    if not recipe.lora_target_modules:
        raise RecipeError("lora_target_modules is empty: LoRA would train nothing")
    if recipe.load_in_4bit and recipe.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise RecipeError(f"bnb_4bit_quant_type must be nf4 or fp4; got {recipe.bnb_4bit_quant_type!r}")
    if recipe.push_to_hub and not recipe.hub_model_id:
        raise RecipeError("push_to_hub: true needs hub_model_id (e.g. your-name/llama3-8b-alpaca-qlora)")
    if recipe.learning_rate <= 0:
        raise RecipeError(f"learning_rate must be positive; got {recipe.learning_rate}")
    # Divisibility for one process is checked here; the launcher's world size is checked again at train time.
    gradient_accumulation_steps(recipe, world_size=1)


def gradient_accumulation_steps(recipe: Recipe, world_size: int) -> int:
    """global_batch_size / (per_device_train_batch_size x world_size), which must be a whole number."""
    per_step = recipe.per_device_train_batch_size * world_size
    steps, remainder = divmod(recipe.global_batch_size, per_step)
    if remainder or steps == 0:
        raise RecipeError(
            f"global_batch_size {recipe.global_batch_size} is not a whole multiple of "
            f"per_device_train_batch_size {recipe.per_device_train_batch_size} x world size {world_size} "
            f"= {per_step}; choose a micro-batch or process count that divides it"
        )
    return steps


def recipe_to_dict(recipe: Recipe, **derived: Any) -> dict[str, Any]:
    """The fully resolved recipe, plus derived values (e.g. gradient_accumulation_steps) for ``recipe.yaml``."""
    resolved = dataclasses.asdict(recipe)
    if derived:
        resolved["derived"] = derived
    return resolved


def dump_recipe(recipe: Recipe, path: str | os.PathLike, **derived: Any) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe, **derived), sort_keys=False))
