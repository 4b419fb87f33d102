"""The engine a launch shards with, read from what ``accelerate launch`` exported, and the glue each one needs.

accelerate hands its config to the processes it starts as environment variables (``ACCELERATE_USE_FSDP``,
``FSDP_VERSION``, ``FSDP_ACTIVATION_CHECKPOINTING``, ..., ``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_ZERO_STAGE``), so the engine is known before a weight loads. Sharding, gathering and
checkpoint formats stay the engines' own; this module only:

- refuses, before loading, the combinations that cannot work, saying why;
- lets FSDP shard across CPU processes (gloo) as it does across GPUs: accelerate 1.15 quietly turns an FSDP
  launch without an accelerator into plain data parallelism (``MULTI_CPU``);
- gathers the final adapter from FSDP2's shards, and only the adapter (a ``FULL_STATE_DICT`` save would
  gather the whole base onto rank 0 to keep a few MB of it);
- says which engine wrote a checkpoint, so a resume under another one fails with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lora_recipe.recipe.schema import Recipe, RecipeError


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


@dataclass(frozen=True)
class Engine:
    """How this launch splits the work: ``single``, ``ddp``, ``fsdp``, ``zero2`` or ``zero3`` (or ``zero1``)."""

    name: str
    fsdp_version: int = 0

    @property
    def shards_weights(self) -> bool:
        return self.name in ("fsdp", "zero3")

    @property
    def plan_strategy(self) -> str:
        """The strategy name :func:`estimates.memory` plans for (ZeRO-2 holds what DDP does, in DeepSpeed's dtypes)."""
        return self.name if self.name not in ("single", "ddp") else "ddp"

    def __str__(self) -> str:
        return {"fsdp": f"FSDP{self.fsdp_version}", "ddp": "DDP", "single": "one process"}.get(
            self.name, f"DeepSpeed ZeRO-{self.name[-1]}"
        )


def _zero_stage() -> int:
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None and os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        try:  # a deepspeed_config_file instead of accelerate's zero_stage key
            config = json.loads(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
            stage = config.get("zero_optimization", {}).get("stage")
        except (OSError, ValueError) as error:
            raise RecipeError(
                f"the DeepSpeed config file {os.environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']} is "
                f"unreadable ({error}): fix it or the accelerate config that names it"
            ) from None
    return int(stage if stage is not None else 0)


def adapter_bytes_per_parameter(recipe: Recipe, strategy: str = "ddp") -> int:
    """PEFT keeps LoRA weights in fp32, except on a 4-bit base computing in 16 bits (bf16, as TRL and the QLoRA
    paper train them) and under DeepSpeed with bf16 (it runs the whole module in bf16, its optimizer keeping fp32
    masters). A 4-bit base computing in fp32 keeps fp32 adapters: bf16 ones would run every LoRA matmul in bf16,
    which a CPU without bf16 hardware emulates many times slower, in a run whose start line says fp32."""
    if strategy.startswith("zero") and recipe.bf16:
        return 2
    if recipe.load_in_4bit and recipe.bnb_4bit_compute_dtype != "float32":
        return 2
    return 4


def current_engine() -> Engine:
    """The engine of this process's launch (``accelerate launch`` exports it; a plain ``train`` is one process)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return Engine("fsdp", int(os.environ.get("FSDP_VERSION", "1")))
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return Engine(f"zero{_zero_stage()}")
    return Engine("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single")


def check_engine(recipe: Recipe, engine: Engine) -> None:
    """Combinations that cannot train correctly fail here, before anything loads (the LoRA init's own refusals:
    :func:`hf_lora_recipe.inits.check_engine`)."""
    if engine.name == "fsdp":
        if engine.fsdp_version != 2:
            raise RecipeError(
                f"the accelerate config asks for FSDP{engine.fsdp_version}; hf-lora-recipe runs FSDP2 (fsdp_version: 2, "
                "per-parameter sharding, as in accelerate_configs/fsdp_lora.yaml and fsdp_qlora.yaml): FSDP1's flat "
                "parameters need one dtype per unit and its full-state-dict save fails on NF4 bases"
            )
        if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
            raise RecipeError(
                "fsdp_activation_checkpointing: true in the accelerate config would save every checkpoint and the "
                "final adapter empty: FSDP's wrapper renames each decoder layer (_checkpoint_wrapped_module) and PEFT "
                "then finds no adapter in the state dict; set it to false: the recipe's gradient_checkpointing does "
                "the same job (as in accelerate_configs/fsdp_lora.yaml)"
            )
        if recipe.load_in_4bit:
            storage = recipe.bnb_4bit_quant_storage
            if storage in ("uint8", "int8"):
                raise RecipeError(
                    f"bnb_4bit_quant_storage: {storage} cannot be sharded by FSDP (it shards floating "
                    "tensors only): set bnb_4bit_quant_storage: bfloat16"
                )
            if recipe.bf16 and storage != "bfloat16":
                raise RecipeError(
                    f"bnb_4bit_quant_storage: {storage} with bf16: true under FSDP: FSDP casts every parameter to bf16 "
                    "for its all-gather, which would scramble the packed 4-bit weights; set bnb_4bit_quant_storage: "
                    "bfloat16"
                )
    if engine.name.startswith("zero"):
        from importlib.util import find_spec

        if engine.name == "zero3" and recipe.load_in_4bit:
            raise RecipeError(
                "DeepSpeed ZeRO-3 with an NF4 base (load_in_4bit: true) is not supported here: shard a "
                "4-bit base with FSDP (accelerate_configs/fsdp_qlora.yaml), or pass --load_in_4bit false"
            )
        if find_spec("deepspeed") is None:
            raise RecipeError(
                "the accelerate config asks for DeepSpeed, which is not installed here: "
                "pip install 'hf-lora-recipe[deepspeed]' (or launch with another accelerate config)"
            )


def let_fsdp_run_on_cpu() -> bool:
    """Make an FSDP launch without an accelerator shard over gloo, as it would over NCCL; True when needed.

    accelerate 1.15 enables FSDP only for accelerator backends: on CPU processes it leaves the state at
    ``MULTI_CPU`` and the model is wrapped in DDP instead, with no message. torch's FSDP2 itself runs on CPU
    (``fully_shard`` over a gloo group), so the state is set to FSDP once accelerate has built it.
    """
    import torch

    if not _flag("ACCELERATE_USE_FSDP") or torch.cuda.is_available():
        return False
    from hf_lora_recipe.upstream.accelerate import let_fsdp_state_run_on_cpu

    let_fsdp_state_run_on_cpu()
    return True


def full_adapter_state(model: Any) -> dict[str, Any]:
    """Every trainable tensor of an FSDP2-sharded model, whole, on the CPU of every rank, under the model's own
    parameter names (FSDP2 shards in place: no wrapper renames them).

    A collective (each ``full_tensor`` is an all-gather): every rank calls it and walks the parameters in the
    same order. Only the adapter travels: a few MB, where a full state dict would gather the base too.
    """
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = whole.detach().to("cpu", copy=True)
    return state


def save_sharded_adapter(trainer: Any, directory: str) -> None:
    """The FSDP counterpart of ``trainer.save_model`` for our adapter: gathered by every rank, then written by
    rank 0 through PEFT's ``save_pretrained``, as an unsharded run writes it."""
    state = full_adapter_state(trainer.model)
    if trainer.is_world_process_zero():
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
            directory, state_dict=state, safe_serialization=True
        )


def checkpoint_engine(checkpoint: Path) -> str:
    """Which family of engine wrote ``checkpoint``: ``fsdp`` (sharded folders), ``deepspeed`` (global_stepN)
    or ``plain`` (one process or DDP: adapter_model.safetensors + optimizer.pt)."""
    names = [path.name for path in checkpoint.iterdir()]
    if any(name.startswith("pytorch_model_fsdp") for name in names):
        return "fsdp"
    if any(name.startswith("global_step") for name in names):
        return "deepspeed"
    return "plain"


def engine_family(engine: Engine) -> str:
    return "fsdp" if engine.name == "fsdp" else "deepspeed" if engine.name.startswith("zero") else "plain"


def check_resume_engine(checkpoint: Path, engine: Engine) -> None:
    """A checkpoint resumes under the engine family that wrote it: each stores its optimizer state its own way."""
    written = checkpoint_engine(checkpoint)
    if written == engine_family(engine):
        return
    describe = {
        "fsdp": "FSDP (sharded model and optimizer folders)",
        "deepspeed": "DeepSpeed (a global_stepN folder of partitioned states)",
        "plain": "one process or DDP (adapter_model.safetensors and optimizer.pt)",
    }
    raise RecipeError(
        f"{checkpoint} was written by {describe[written]} and this launch uses {engine}, which cannot read that "
        "optimizer state: resume it with an accelerate config of the same engine (any number of processes), or "
        "pass --overwrite_output_dir true (or another output_dir) to start again"
    )
