"""Parameters, memory and time for a recipe, from config.json alone: the figures `plan` prints and lints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lora_recipe.data.mixture import source_recipes
from hf_lora_recipe.distributed.engines import adapter_bytes_per_parameter
from hf_lora_recipe.inits import init_for
from hf_lora_recipe.inits.base import peft_init_lora_weights
from hf_lora_recipe.model.loading import check_attention_name
from hf_lora_recipe.planning.estimates import (
    GIB,
    GPUS,
    AdapterDims,
    Shape,
    flops_per_token,
    largest_fitting_micro_batch,
    measure_shape,
    memory,
    nf4_bytes,
    rank_over_limits,
)
from hf_lora_recipe.recipe.schema import ALL_PROJECTIONS, AUTO, Recipe, RecipeError
from hf_lora_recipe.templates.untrained_tokens import TemplateTokens, inspect_if_local


ALPACA_ESTIMATE = (52_002, 197)  # rows; mean tokens/example (Llama-2 tokenizer on the 999-row sample, max 512)


def read_config(model_config: str, trust_remote_code: bool = False) -> Any:
    """The architecture's config from a config.json, a folder holding one, or a Hub id; user errors in one line."""
    from hf_lora_recipe.model.loading import check_sizes, read_model_config

    path = Path(model_config).expanduser()
    name = str(path.parent) if path.is_file() else str(path) if path.exists() else model_config
    config = read_model_config(name, trust_remote_code=trust_remote_code, where=model_config)
    check_sizes(config, model_config)
    return config


# ---------------------------------------------------------------- seed traceability and lints


def library_defaults() -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    def defaults(cls: Any) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    import inspect

    bnb = {k: v.default for k, v in inspect.signature(BitsAndBytesConfig.__init__).parameters.items() if k != "self"}
    # LoRA+ is off unless PEFT's create_loraplus_optimizer is called (its ratio has no default)
    return {
        "SFTConfig": defaults(SFTConfig),
        "LoraConfig": defaults(LoraConfig),
        "BitsAndBytesConfig": bnb,
        "create_loraplus_optimizer": {"loraplus_lr_ratio": None},
    }


SEED_MAP = [
    # (seed hyperparameter, recipe key, library field); the seed's value is Recipe()'s, never restated here
    ("LoRA rank", "lora_r", ("LoraConfig", "r")),
    ("LoRA alpha = 2r", "lora_alpha", ("LoraConfig", "lora_alpha")),
    ("LoRA dropout", "lora_dropout", ("LoraConfig", "lora_dropout")),
    ("targets: every attention and MLP projection", "lora_target_modules", ("LoraConfig", "target_modules")),
    ("scaling alpha/r (not rsLoRA)", "use_rslora", ("LoraConfig", "use_rslora")),
    ("plain LoRA (not DoRA)", "use_dora", ("LoraConfig", "use_dora")),
    ("adapter initialisation (step 0 = the base)", "init_lora_weights", ("LoraConfig", "init_lora_weights")),
    ("one learning rate (no LoRA+)", "loraplus_lr_ratio", ("create_loraplus_optimizer", "loraplus_lr_ratio")),
    ("peak learning rate", "learning_rate", ("SFTConfig", "learning_rate")),
    ("cosine decay to 0", "lr_scheduler_type", ("SFTConfig", "lr_scheduler_type")),
    ("epochs", "num_train_epochs", ("SFTConfig", "num_train_epochs")),
    ("AdamW beta1", "adam_beta1", ("SFTConfig", "adam_beta1")),
    ("AdamW beta2", "adam_beta2", ("SFTConfig", "adam_beta2")),
    ("weight decay", "weight_decay", ("SFTConfig", "weight_decay")),
    ("grad-norm clip", "max_grad_norm", ("SFTConfig", "max_grad_norm")),
    ("micro-batch", "per_device_train_batch_size", ("SFTConfig", "per_device_train_batch_size")),
    ("global batch (accumulation derived)", "global_batch_size", ("SFTConfig", "global batch")),
    ("bf16", "bf16", ("SFTConfig", "bf16")),
    ("gradient checkpointing", "gradient_checkpointing", ("SFTConfig", "gradient_checkpointing")),
    ("base in 4-bit", "load_in_4bit", ("BitsAndBytesConfig", "load_in_4bit")),
    ("NF4", "bnb_4bit_quant_type", ("BitsAndBytesConfig", "bnb_4bit_quant_type")),
    ("double quantization", "use_bnb_nested_quant", ("BitsAndBytesConfig", "bnb_4bit_use_double_quant")),
    ("bf16 compute dtype", "bnb_4bit_compute_dtype", ("BitsAndBytesConfig", "bnb_4bit_compute_dtype")),
    ("max length", "max_length", ("SFTConfig", "max_length")),
]


def traceability(recipe: Recipe) -> list[dict[str, Any]]:
    defaults = library_defaults()
    seed = Recipe()
    sft = defaults["SFTConfig"]
    # TRL has no global batch: it is micro-batch x accumulation x processes, 8 x 1 x 1 by default
    sft["global batch"] = sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"]
    rows = []
    for seed_name, key, (library, library_field) in SEED_MAP:
        value, seed_value = getattr(recipe, key), getattr(seed, key)
        if key == "init_lora_weights":  # compared as LoraConfig takes it (PEFT's default is the boolean True)
            value, seed_value = peft_init_lora_weights(value), peft_init_lora_weights(seed_value)
        library_default = defaults[library].get(library_field)
        rows.append(
            {
                "seed": seed_name,
                "field": f"{library}.{library_field}",
                "value": value,
                "seed_value": seed_value,
                "library_default": library_default,
                "differs_from_seed": value != seed_value,
                "differs_from_library_default": value != library_default,
            }
        )
    return rows


@dataclass
class Lint:
    level: str  # "error", "warning" or "note" (what plan could not check, and where it will be)
    message: str
    fix: str


def lints(
    recipe: Recipe,
    shape: Shape,
    num_gpus: int,
    gpu_bf16: bool = True,
    truncated_share: float | None = None,
    pad_masks_eos: bool = False,
    template_tokens: TemplateTokens | None = None,
) -> list[Lint]:
    found: list[Lint] = []
    if template_tokens is not None and not recipe.train_template_tokens:
        if template_tokens.suspects:
            found.append(Lint("error", template_tokens.problem(), template_tokens.fix(recipe)))
        elif template_tokens.skipped and recipe.chat_template != "llama2":
            # llama2's tokens are BOS/EOS, which every base trains; other templates bring their own tokens
            found.append(
                Lint(
                    "note",
                    f"the chat template's special-token rows were not checked: {template_tokens.skipped}",
                    "train checks them before the model loads when the base's safetensors are on the "
                    "machine; train_template_tokens: true trains them whatever they hold",
                )
            )
    found += [Lint("note", problem, fix) for problem, fix in init_for(recipe).plan_notes(recipe)]
    if shape.unmatched_targets:
        found.append(
            Lint(
                "error",
                f"target module(s) {shape.unmatched_targets} match no module of this model",
                "use the model's projection names (e.g. q_proj, v_proj for Llama)",
            )
        )
    over = rank_over_limits(recipe, shape)
    if over:
        everywhere = len(over) == len(shape.rank_limits)  # train refuses this one
        found.append(
            Lint(
                "error" if everywhere else "warning",
                f"lora_r {recipe.lora_r} exceeds min(in, out) of "
                + ", ".join(f"{name} ({limit})" for name, limit in over.items())
                + ": the extra rank there adds parameters, not capacity",
                f"set lora_r to at most {max(over.values()) if everywhere else min(over.values())}",
            )
        )
    if recipe.lora_alpha == recipe.lora_r:
        found.append(
            Lint(
                "warning",
                f"lora_alpha == lora_r ({recipe.lora_r}): scale alpha/r = 1 under-uses the adapter",
                f"set lora_alpha: {2 * recipe.lora_r} (2r, the seed's choice)",
            )
        )
    if set(recipe.lora_target_modules) <= {"q_proj", "v_proj"}:
        found.append(
            Lint(
                "warning",
                "only q_proj/v_proj are adapted: underfits instruction following",
                f"target every attention and MLP projection: lora_target_modules {ALL_PROJECTIONS} (the seed's)",
            )
        )
    if not recipe.bf16 and gpu_bf16:
        found.append(
            Lint(
                "warning",
                "bf16 is off on a bf16-capable GPU: fp32 compute is slower and larger, fp16 overflows",
                "set bf16: true",
            )
        )
    if recipe.load_in_4bit and recipe.bnb_4bit_compute_dtype != "bfloat16" and gpu_bf16:  # CPUs may lack bf16
        found.append(
            Lint(
                "warning",
                f"NF4 with compute dtype {recipe.bnb_4bit_compute_dtype}",
                "set bnb_4bit_compute_dtype: bfloat16",
            )
        )
    if not recipe.completion_only_loss:
        found.append(
            Lint(
                "warning",
                "completion_only_loss is off: the prompt is trained on, so the model learns to echo instructions",
                "set completion_only_loss: true",
            )
        )
    if pad_masks_eos:
        found.append(
            Lint(
                "warning",
                "the pad token is the EOS token and the collator masks pad positions: EOS is never supervised",
                "give the tokenizer a distinct pad token (or build labels before padding, as this package does)",
            )
        )
    if not 1e-5 <= recipe.learning_rate <= 1e-3:
        found.append(
            Lint(
                "warning",
                f"learning_rate {recipe.learning_rate:g} is outside the usual LoRA range 1e-5..1e-3",
                "the seed uses 3e-4 (LoRA tolerates ~10x the full fine-tuning rate)",
            )
        )
    if recipe.global_batch_size % (recipe.per_device_train_batch_size * num_gpus):
        found.append(
            Lint(
                "error",
                f"global_batch_size {recipe.global_batch_size} is not divisible by micro-batch "
                f"{recipe.per_device_train_batch_size} x {num_gpus} GPUs",
                "change the micro-batch or GPU count",
            )
        )
    if truncated_share is not None and truncated_share > 0.05:
        found.append(
            Lint(
                "warning",
                f"max_length {recipe.max_length} truncates {truncated_share:.1%} of examples' responses",
                "raise max_length or filter long examples",
            )
        )
    return found


def collator_masks_eos(tokenizer: Any) -> bool:
    """Run the real collator on one example whose pad token is EOS: is the final EOS still supervised?"""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    batch = collator([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]}, {"input_ids": [5], "labels": [-100]}])
    return int(batch["labels"][0, 2]) != eos


# ---------------------------------------------------------------- the plan


def make_plan(
    recipe: Recipe,
    model_config: str | None = None,
    gpu: str = "24GB",
    gpu_memory_gb: float | None = None,
    num_gpus: int = 1,
    mfu: float = 0.4,
) -> dict[str, Any]:
    if gpu not in GPUS:
        raise RecipeError(f"unknown --gpu {gpu!r}; one of {', '.join(GPUS)} (or give --gpu_memory_gb)")
    memory_gib, peak_tflops = GPUS[gpu]
    memory_gib = gpu_memory_gb or memory_gib
    check_attention_name(recipe)
    config = read_config(model_config or recipe.model_name_or_path, recipe.trust_remote_code)
    shape = measure_shape(config, recipe)
    data = token_counts(recipe)
    plan: dict[str, Any] = {
        "model": model_config or recipe.model_name_or_path,
        "gpu": gpu,
        "gpu_memory_gib": memory_gib,
        "num_gpus": num_gpus,
    }
    base_parameters = shape.total - shape.trainable
    plan["parameters"] = {
        "base_parameters": base_parameters,
        "adapter_parameters": shape.trainable,
        "total": shape.total,
        "trainable": shape.trainable,
        "trainable_share_of_base": shape.trainable / max(base_parameters, 1),
        "by_module": shape.lora_by_module,
        "by_module_dims": {key: dataclasses.asdict(dims) for key, dims in shape.lora_dims.items()},
        "lora_r": recipe.lora_r,
        "target_modules": shape.target_modules,
        "target_parameters": shape.target_parameters,
    }
    # saved in the dtype it trains in, at the rank its init saves (PiSSA/OLoRA converted: [B | -B0] [A ; A0], 2r)
    plan["adapter_file_bytes"] = adapter_bytes_per_parameter(recipe) * shape.trainable * init_for(recipe).rank_factor
    strategies = ["ddp"] + (["fsdp", "zero3"] if num_gpus > 1 else [])
    limit = memory_gib * GIB
    if recipe.per_device_train_batch_size == AUTO:
        # as train resolves it, against this GPU (or memory_budget_gb); strategies below share the choice
        budget = recipe.memory_budget_gb * GIB if recipe.memory_budget_gb else limit
        chosen = (
            None
            if shape.unmatched_targets
            else largest_fitting_micro_batch(shape, recipe, budget, num_gpus, on_gpu=True)
        )
        plan["micro_batch_auto"] = {"chosen": chosen, "budget_bytes": budget}
        recipe = dataclasses.replace(recipe, per_device_train_batch_size=chosen or 1)
    plan["memory"] = {}
    for strategy in strategies:
        if shape.unmatched_targets:
            break
        estimate = memory(shape, recipe, recipe.per_device_train_batch_size, num_gpus, strategy)
        other = dataclasses.replace(recipe, gradient_checkpointing=not recipe.gradient_checkpointing)
        plan["memory"][strategy] = {
            "bytes": dataclasses.asdict(estimate),
            "total_bytes": estimate.total,
            "fits": estimate.total <= limit,
            f"total_bytes_{'without' if recipe.gradient_checkpointing else 'with'}_checkpointing": memory(
                shape, other, recipe.per_device_train_batch_size, num_gpus, strategy
            ).total,
            "nf4_bytes_without_double_quant": nf4_bytes(shape.quantizable_tensors, False)
            // (num_gpus if strategy != "ddp" else 1)
            if recipe.load_in_4bit
            else 0,
            "largest_micro_batch": largest_fitting_micro_batch(shape, recipe, limit, num_gpus, strategy, on_gpu=True),
        }
    flops = flops_per_token(shape, recipe) if not shape.unmatched_targets else {"total": 0.0}
    plan["flops_per_token"] = flops
    epochs = recipe.num_train_epochs
    if data["examples"]:
        steps_per_epoch = math.ceil(data["examples"] / recipe.global_batch_size)
        steps = recipe.max_steps if recipe.max_steps > 0 else math.ceil(steps_per_epoch * epochs)
        tokens = data["tokens"] * (steps / steps_per_epoch)
        seconds = tokens * flops["total"] / (peak_tflops * 1e12 * mfu * num_gpus)
        plan["schedule"] = {
            **data,
            "steps_per_epoch": steps_per_epoch,
            "optimizer_steps": steps,
            "training_tokens": int(tokens),
            "peak_tflops": peak_tflops,
            "mfu": mfu,
            "hours": seconds / 3600,
        }
    else:
        plan["schedule"] = {**data, "hours": None}
    plan["seed_traceability"] = traceability(recipe)
    plan["lints"] = [
        dataclasses.asdict(l)
        for l in lints(
            recipe,
            shape,
            num_gpus,
            truncated_share=data.get("truncated_share"),
            pad_masks_eos=data.get("pad_masks_eos", False),
            template_tokens=inspect_if_local(recipe),
        )
    ]
    return plan


def token_counts(recipe: Recipe) -> dict[str, Any]:
    """Exact counts from the real preprocessing for a local dataset; else an estimate, stated as such. A stream
    trains max_steps x global batch examples, at the mean length of its first rows."""
    if recipe.streaming and Path(recipe.dataset_name).exists():  # a Hub stream: unknown below, as a Hub dataset
        from hf_lora_recipe.data.streaming import build_stream
        from hf_lora_recipe.templates.tokenizer import tokenizer_for

        _, head = build_stream(recipe, tokenizer_for(recipe))
        examples = recipe.max_steps * recipe.global_batch_size
        return {
            "source": f"streaming: max_steps x global batch examples, at the mean length of the first "
            f"{head.examples_in} rows",
            "examples": examples,
            "tokens": int(head.mean_length * examples),
            "truncated_share": head.truncated / max(head.examples_out, 1),
        }
    if all(Path(single.dataset_name).exists() for single in source_recipes(recipe)):
        from hf_lora_recipe.data.pipeline import build_sft_dataset
        from hf_lora_recipe.templates.tokenizer import tokenizer_for

        tokenizer = tokenizer_for(recipe)
        dataset, report = build_sft_dataset(recipe, tokenizer)
        return {
            "source": "exact (real preprocessing)",
            "examples": report.examples_out,
            "tokens": report.total_tokens,
            "truncated_share": report.truncated / max(report.examples_out, 1),
            "pad_masks_eos": collator_masks_eos(tokenizer),
        }
    if recipe.dataset_name == "tatsu-lab/alpaca" and not recipe.datasets:
        rows, mean = ALPACA_ESTIMATE
        return {
            "source": f"estimate: {rows:,} rows x ~{mean} tokens (Llama-2 tokenizer on the Alpaca sample)",
            "examples": rows,
            "tokens": rows * min(mean, recipe.max_length),
        }
    return {
        "source": "unknown: point dataset_name (or each datasets entry) at a local copy for exact counts",
        "examples": None,
        "tokens": None,
    }


# ---------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def render(plan: dict[str, Any]) -> str:
    p = plan["parameters"]
    lines = [f"plan for {plan['model']} on {plan['num_gpus']} x {plan['gpu']} ({plan['gpu_memory_gib']:g} GiB)", ""]
    lines.append(
        f"parameters     base {p['base_parameters']:,} + adapter {p['adapter_parameters']:,} = total {p['total']:,}; "
        f"trainable {p['trainable']:,} ({p['trainable_share_of_base']:.3%} of the base)"
    )
    targets = ", ".join(p["target_modules"] + [f"{name} (parameter)" for name in p["target_parameters"]])
    lines.append(f"adapted        {targets}")
    for module, count in p["by_module"].items():
        dims = p["by_module_dims"].get(module)
        why = f"  = {AdapterDims(**dims).line(p['lora_r'])}" if dims else ""
        lines.append(f"  {module:<22}{count:>14,}{why}")
    lines.append(
        f"adapter file   {_gib(plan['adapter_file_bytes'])} "
        f"({'bf16' if plan['adapter_file_bytes'] < 4 * p['trainable'] else 'fp32'} safetensors)"
    )
    auto = plan.get("micro_batch_auto")
    if auto:
        lines += [
            "",
            f"micro-batch    auto -> {auto['chosen'] or 'none fits (planned below at 1)'} "
            f"(largest divisor of the per-GPU batch within {_gib(auto['budget_bytes'])})",
        ]
    for strategy, m in plan["memory"].items():
        lines.append("")
        lines.append(f"memory per GPU ({strategy}), micro-batch x max_length as in the recipe:")
        for name, value in m["bytes"].items():
            lines.append(f"  {name:<22}{_gib(value):>12}")
        lines.append(f"  {'total':<22}{_gib(m['total_bytes']):>12}   -> {'FITS' if m['fits'] else 'DOES NOT FIT'}")
        for key, value in m.items():
            if key.startswith("total_bytes_with"):
                lines.append(f"  ({key.removeprefix('total_bytes_').replace('_', ' ')}: {_gib(value)})")
        if m["nf4_bytes_without_double_quant"]:
            lines.append(f"  (NF4 without double quantization: {_gib(m['nf4_bytes_without_double_quant'])})")
        lines.append(f"  largest micro-batch that fits: {m['largest_micro_batch']}")
    s = plan["schedule"]
    lines += ["", f"data           {s['source']}"]
    if s.get("hours") is not None:
        lines.append(
            f"  {s['examples']:,} examples, {s['steps_per_epoch']} steps/epoch, {s['optimizer_steps']} optimizer steps, "
            f"{s['training_tokens']:,} training tokens"
        )
        lines.append(
            f"time           {plan['flops_per_token']['total'] / 1e9:.1f} GFLOP/token at {s['peak_tflops']:g} TFLOP/s "
            f"x MFU {s['mfu']:g} x {plan['num_gpus']} GPU(s): {s['hours']:.1f} h"
        )
    lines += ["", "seed traceability (* differs from the seed, ! differs from the library default):"]
    for row in plan["seed_traceability"]:
        marks = ("*" if row["differs_from_seed"] else " ") + ("!" if row["differs_from_library_default"] else " ")
        value = ",".join(row["value"]) if isinstance(row["value"], list) else row["value"]
        lines.append(
            f"  {marks} {row['seed']:<40} {row['field']:<45} {value!s:<14} (library default {row['library_default']!s})"
        )
    lines += ["", "lints:" if plan["lints"] else "lints: none"]
    for lint in plan["lints"]:
        lines.append(f"  {lint['level'].upper()}: {lint['message']}\n      fix: {lint['fix']}")
    return "\n".join(lines)
