"""Surviving real runs: resume, stop cleanly on SIGTERM/SIGINT, stop loudly on NaN, prove what each rank read.

Checkpoints are Trainer's own (``checkpoint-N/``: adapter, optimizer, scheduler, RNG states and the data
position; never the frozen base) plus ``hf_lora_recipe.json`` with the world size and accumulation they
were taken under, so a resume at another world size can say what changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from . import log
from .config import Recipe, RecipeError

RUN_STATE = "hf_lora_recipe.json"


class NonFiniteError(RuntimeError):
    pass


def resume_checkpoint(recipe: Recipe) -> str | None:
    """The checkpoint to resume from: explicit path, ``true`` (latest), or automatic when one exists."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(recipe.output_dir)
    latest = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    asked = recipe.resume_from_checkpoint
    if asked and asked.lower() not in ("true", "false"):
        if not Path(asked).is_dir():
            raise RecipeError(f"resume_from_checkpoint: {asked} is not a checkpoint directory")
        return asked
    if asked and asked.lower() == "false" or recipe.overwrite_output_dir:
        return None
    if asked and asked.lower() == "true" and latest is None:
        raise RecipeError(f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N directory")
    return latest


def resume_note(checkpoint: str, accumulation: int, world_size: int) -> str:
    """The log line for a resume, naming a change of world size and the re-derived accumulation."""
    state_file = Path(checkpoint) / RUN_STATE
    before = json.loads(state_file.read_text()) if state_file.is_file() else {}
    note = f"resuming from {checkpoint}"
    if before and (before.get("world_size"), before.get("gradient_accumulation_steps")) != (world_size, accumulation):
        note += (f" (world size {before.get('world_size')} -> {world_size}: gradient accumulation re-derived "
                 f"{before.get('gradient_accumulation_steps')} -> {accumulation}, global batch unchanged)")
    return note


def prepare_output_dir(recipe: Recipe, accumulation: int, world_size: int) -> str | None:
    """The checkpoint to resume from (logged), after clearing old checkpoints for ``overwrite_output_dir``."""
    checkpoint = resume_checkpoint(recipe)
    if checkpoint:
        log.info(resume_note(checkpoint, accumulation, world_size))
    elif recipe.overwrite_output_dir and log.is_main_process():
        for old in Path(recipe.output_dir).glob("checkpoint-*"):
            shutil.rmtree(old)
    return checkpoint


class RunStateCallback(TrainerCallback):
    """Records, in every checkpoint, the world size and accumulation it was trained under."""

    def __init__(self, accumulation: int, world_size: int):
        self.state = {"gradient_accumulation_steps": accumulation, "world_size": world_size}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / RUN_STATE).write_text(json.dumps(self.state) + "\n")


class NonFiniteGuard(TrainerCallback):
    """Stops at the first NaN/Inf gradient, before the optimizer can write it into the adapter.

    A NaN or Inf loss makes the gradients non-finite too, so one check covers both. DDP has averaged the
    gradients already, so every rank stops at the same step.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
            raise NonFiniteError(
                f"non-finite loss or gradient at step {state.global_step + 1}; training stopped before the update. "
                f"Last good checkpoint: {last or 'none yet'} (kept). Lower learning_rate or check the data, "
                "then rerun to resume from it."
            )


class StopOnSignal(TrainerCallback):
    """SIGTERM (a scheduler's pre-emption notice) or SIGINT: save a checkpoint at the end of this step, stop.

    Ranks agree through an all-reduce so they all stop (and save, a collective under FSDP) at one step.
    """

    def __init__(self):
        self.signal: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._request)

    def _request(self, signum, frame):
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs):
        import torch
        import torch.distributed as dist

        requested = torch.tensor([float(self.signal or 0)])
        if dist.is_available() and dist.is_initialized():
            requested = requested.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        if requested.item():
            self.signal = self.signal or int(requested.item())
            control.should_save = True
            control.should_training_stop = True
        return control


def check_saved_adapter(directory: Path, recipe: Recipe, trained_steps: int) -> None:
    """ZeRO-3 and some FSDP setups save empty or unsharded-placeholder adapters: refuse to publish one."""
    from safetensors import safe_open

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"no adapter_model.safetensors in {directory}")
    nonzero_b = False
    with safe_open(str(path), framework="pt") as tensors:
        names = list(tensors.keys())
        if not names:
            raise RuntimeError(f"{path} holds no tensors (the ZeRO-3 empty-adapter failure)")
        for name in names:
            tensor = tensors.get_tensor(name)
            if tensor.numel() == 0 or recipe.lora_r not in tensor.shape:
                raise RuntimeError(f"{path}: {name} has shape {tuple(tensor.shape)}, not a rank-{recipe.lora_r} factor")
            if "lora_B" in name and bool(tensor.abs().sum() > 0):
                nonzero_b = True
    if trained_steps > 0 and not nonzero_b:
        raise RuntimeError(f"{path}: every lora_B is zero after {trained_steps} steps: the adapter was not gathered")

