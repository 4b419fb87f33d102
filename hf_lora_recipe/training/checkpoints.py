"""Surviving real runs: resume, stop cleanly on SIGTERM/SIGINT, stop loudly on NaN, prove what each rank read.

Checkpoints are Trainer's own (``checkpoint-N/``: adapter, optimizer, scheduler, RNG states and the data
position; never the frozen base) plus ``hf_lora_recipe.json`` with the world size and accumulation they
were taken under, so a resume at another world size can say what changed. That file is written last, so it
also marks the checkpoint complete: a resume uses only the newest complete checkpoint whose files load, and
sets newer, incomplete ones aside (renamed ``incomplete-checkpoint-N``, never deleted) with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hf_lora_recipe import log
from hf_lora_recipe.files import write_text_atomically
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, peft_target_modules


RUN_STATE = "hf_lora_recipe.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATES = {"optimizer.pt", "optimizer.bin", "optimizer_0"}  # plain / FSDP full / FSDP sharded


class NonFiniteError(RuntimeError):
    pass


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE = "incomplete-"  # prefix of a checkpoint that could not be trusted: kept for inspection, never resumed
# Trainer's checkpoint folders and those set aside (a second one set aside at the same step gets ".k")
CHECKPOINT_FOLDER = re.compile(rf"^({SET_ASIDE})?checkpoint-\d+(\.\d+)?$")


@dataclass(frozen=True)
class Start:
    """Where a run starts: fresh, from a checkpoint, or not at all because the run already finished."""

    checkpoint: str | None = None
    step: int = 0
    finished: str | None = None  # the run is complete: why, and how to train more
    publish_only: bool = False  # training reached max_steps but the final adapter was never written
    resumes: list[dict] = field(default_factory=list)  # every resume of this run so far, this one last
    identity: dict[str, Any] | None = None  # what this run trains on (run_identity), for its checkpoints


def checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest (largest N) first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name} is unreadable, truncated or corrupt ({error})") from None


def checkpoint_problem(checkpoint: Path, require_marker: bool = True) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (None when it is complete).

    Trainer writes ``checkpoint-N`` in place; :class:`RunStateCallback` writes ``hf_lora_recipe.json`` after
    everything else, so a save cut short (killed, disk full) has no marker. The files are checked too: a
    truncated adapter, optimizer or trainer state fails here instead of half-way through loading.
    """
    from safetensors import safe_open

    try:
        if require_marker and not isinstance(_read_json(checkpoint / RUN_STATE), dict):
            return f"{RUN_STATE} is not a mapping"
        state = _read_json(checkpoint / TRAINER_STATE)
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return f"{TRAINER_STATE} holds no global_step"
        adapter = checkpoint / "adapter_model.safetensors"
        if adapter.is_file():
            _read_json(checkpoint / "adapter_config.json")
    except ValueError as problem:
        if require_marker and str(problem) == f"no {RUN_STATE}":
            return f"no {RUN_STATE}: its save did not finish (killed, or the disk filled)"
        return str(problem)
    if adapter.is_file():
        try:
            with safe_open(str(adapter), framework="pt") as tensors:
                if not list(tensors.keys()):
                    return "adapter_model.safetensors holds no tensors"
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error class for a damaged file
            return f"adapter_model.safetensors is truncated or corrupt ({error})"
    elif not any(checkpoint.glob("pytorch_model_fsdp_*")):  # FSDP's sharded state is a folder of its own
        return "no adapter_model.safetensors"
    names = {p.name for p in checkpoint.iterdir()}
    if not names & OPTIMIZER_STATES and not any(name.startswith("global_step") for name in names):  # DeepSpeed's
        return "no optimizer state"
    for path in sorted(checkpoint.iterdir()):  # torch.save writes zip archives: a cut-off one has no central directory
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.name} is truncated or corrupt"
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"])


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes :func:`checkpoint_problem` (for messages; nothing is moved)."""
    return next((c for c in checkpoints(Path(output_dir)) if checkpoint_problem(c) is None), None)


def set_aside(checkpoint: Path, problem: str) -> None:
    """Rename an incomplete checkpoint out of Trainer's way (it would resume from it, rotate by it, or save
    into it); it is ours, but kept for inspection rather than deleted. Main process only."""
    if not log.is_main_process():
        return  # the main process moves it and says so; every process skips it all the same
    target = checkpoint.with_name(SET_ASIDE + checkpoint.name)
    suffix = 1
    while target.exists():
        suffix += 1
        target = checkpoint.with_name(f"{SET_ASIDE}{checkpoint.name}.{suffix}")
    try:
        os.replace(checkpoint, target)
    except FileNotFoundError:  # another process of this launch moved it already
        return
    except OSError as error:
        raise RecipeError(
            f"{checkpoint} is incomplete ({problem}) and cannot be moved aside ({error.strerror}); "
            "delete it, then rerun"
        ) from None
    log.warn(f"skipped {checkpoint}: {problem}; set aside as {target.name} (delete it to free the space)")


def final_adapter_written(output_dir: Path) -> bool:
    return (output_dir / "adapter_config.json").is_file() and (output_dir / "adapter_model.safetensors").is_file()


def _asked_checkpoint(recipe: Recipe) -> Path | None:
    asked = recipe.resume_from_checkpoint
    if not asked or asked.lower() in ("true", "false"):
        return None
    path = Path(asked)
    if not path.is_dir():
        raise RecipeError(
            f"resume_from_checkpoint: {asked} is not a checkpoint directory "
            "(give a checkpoint-N folder, or true for the newest complete one in output_dir)"
        )
    problem = checkpoint_problem(path, require_marker=False)
    if problem:
        raise RecipeError(
            f"resume_from_checkpoint: {asked} cannot be resumed from: {problem}; pick another "
            "checkpoint (or true for the newest complete one in output_dir)"
        )
    return path


def _check_compatible(checkpoint: Path, recipe: Recipe) -> None:
    """A checkpoint of another adapter shape would fail deep inside Trainer's loading: say so first."""
    from hf_lora_recipe.inits import init_for

    config = checkpoint / "adapter_config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    targets = saved.get("target_modules")
    wanted = peft_target_modules(recipe)
    init = init_for(recipe)
    differences = []
    if saved.get("r") not in (None, recipe.lora_r):
        differences.append(f"lora_r {saved.get('r')} there, {recipe.lora_r} here")
    differences += init.check_resume(saved, recipe)
    if isinstance(wanted, list) and isinstance(targets, list) and not init.targets_match(targets, wanted):
        differences.append(f"lora_target_modules {' '.join(sorted(targets))} there, {' '.join(sorted(wanted))} here")
    if differences:
        raise RecipeError(
            f"{checkpoint} holds a different adapter ({'; '.join(differences)}): use the recipe it "
            "was trained with to resume, or --overwrite_output_dir true (or another output_dir) to "
            "start again"
        )


def _finished(checkpoint: Path, recipe: Recipe) -> bool | None:
    """Did training at ``checkpoint`` reach the recipe's end? None: it went past it."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    step = int(state["global_step"])
    if recipe.max_steps > 0:
        return True if step == recipe.max_steps else (None if step > recipe.max_steps else False)
    return step >= int(state.get("max_steps") or 0) > 0 and state.get("num_train_epochs") == recipe.num_train_epochs


def _resumes(checkpoint: Path, recipe: Recipe, identity: dict[str, Any] | None) -> list[dict]:
    """The checkpoint's identity against this run's (refusing what would mix two runs), and the resume history
    with this resume appended when it changes anything."""
    from hf_lora_recipe.training.run_identity import IDENTITY, RESUMES, check_resume, resume_record

    marker = _read_json(checkpoint / RUN_STATE)
    marker = marker if isinstance(marker, dict) else {}
    history = list(marker.get(RESUMES) or [])
    if identity is None or IDENTITY not in marker:  # written before identities were recorded: the adapter check only
        return history
    changes = check_resume(checkpoint, marker[IDENTITY], identity, recipe)
    if changes:
        log.info(f"resuming {checkpoint.name} with changes: {'; '.join(changes)}")
        history.append(resume_record(str(checkpoint), checkpoint_step(checkpoint), changes, marker[IDENTITY]))
    return history


def choose_start(recipe: Recipe, identity: dict[str, Any] | None = None) -> Start:
    """Where this run starts, decided before anything loads: ``overwrite_output_dir`` starts fresh; an explicit
    checkpoint is checked; otherwise the newest *complete* checkpoint in ``output_dir``, incomplete newer ones
    set aside and named. A run that already reached its end does nothing (or only writes its missing adapter)."""
    output_dir = Path(recipe.output_dir)
    asked = (recipe.resume_from_checkpoint or "").lower()
    checkpoint = _asked_checkpoint(recipe)
    if checkpoint is None:
        if recipe.overwrite_output_dir or asked == "false":
            return Start(identity=identity)
        for candidate in checkpoints(output_dir):
            problem = checkpoint_problem(candidate)
            if problem is None:
                checkpoint = candidate
                break
            set_aside(candidate, problem)
    if checkpoint is None:
        if asked == "true":
            raise RecipeError(
                f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-N directory"
            )
        if final_adapter_written(output_dir):
            raise RecipeError(
                f"{output_dir} already holds a finished adapter and no checkpoint to resume from: "
                "pass --overwrite_output_dir true to train it again from scratch, or choose another "
                "output_dir"
            )
        return Start(identity=identity)
    resumes = _resumes(checkpoint, recipe, identity)
    _check_compatible(checkpoint, recipe)
    step = checkpoint_step(checkpoint)
    finished = _finished(checkpoint, recipe)
    if finished is None:
        raise RecipeError(
            f"{checkpoint} is at step {step}, past max_steps {recipe.max_steps}: raise --max_steps to "
            "resume from it, or pass --overwrite_output_dir true (or another output_dir) to start again"
        )
    if finished and final_adapter_written(output_dir):
        end = (
            f"max_steps {recipe.max_steps}"
            if recipe.max_steps > 0
            else f"num_train_epochs {recipe.num_train_epochs:g}"
        )
        done = (
            f"{output_dir} holds the finished adapter ({checkpoint.name}, {end}); nothing to train. To train more, "
            "raise --max_steps; to train again from scratch, pass --overwrite_output_dir true"
        )
        return Start(str(checkpoint), step, finished=done, resumes=resumes, identity=identity)
    return Start(str(checkpoint), step, publish_only=bool(finished), resumes=resumes, identity=identity)


def load_checkpoint_state(trainer: Any, checkpoint: str) -> None:
    """Put a checkpoint's trainer state (step, epoch, log history) into ``trainer`` without training, for a run
    that reached its last step but never wrote its final adapter. The adapter itself is copied from the
    checkpoint's file where there is one; FSDP's sharded adapter (a torch.distributed.checkpoint folder, no
    file) is read whole by every rank into the unwrapped model, to be written from there."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import TrainerState

    if not (Path(checkpoint) / "adapter_model.safetensors").is_file():
        import torch.distributed.checkpoint as dcp

        state = {
            "model": {key: tensor.detach().clone() for key, tensor in get_peft_model_state_dict(trainer.model).items()}
        }
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(next(Path(checkpoint).glob("pytorch_model_fsdp_*")))))
        set_peft_model_state_dict(trainer.model, state["model"])
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))


def resume_note(checkpoint: str, accumulation: int, world_size: int) -> str:
    """The log line for a resume, naming a change of world size and the re-derived accumulation."""
    state_file = Path(checkpoint) / RUN_STATE
    before = json.loads(state_file.read_text()) if state_file.is_file() else {}
    note = f"resuming from {checkpoint}"
    if before and (before.get("world_size"), before.get("gradient_accumulation_steps")) != (world_size, accumulation):
        note += (
            f" (world size {before.get('world_size')} -> {world_size}: gradient accumulation re-derived "
            f"{before.get('gradient_accumulation_steps')} -> {accumulation}, global batch unchanged)"
        )
    return note


def clear_for_fresh_start(recipe: Recipe) -> None:
    """``overwrite_output_dir``: remove our old checkpoints (complete or set aside) so a fresh run never mixes
    with them. Called once the model has loaded, so a failed start loses nothing."""
    if not (recipe.overwrite_output_dir and log.is_main_process()):
        return
    output_dir = Path(recipe.output_dir)
    for old in list(checkpoints(output_dir)) + list(output_dir.glob(SET_ASIDE + "checkpoint-*")):
        shutil.rmtree(old)


class RunStateCallback(TrainerCallback):
    """Records, in every checkpoint, the world size and accumulation it was trained under.

    Written after Trainer has written everything else: its presence marks the checkpoint complete.
    """

    def __init__(
        self, accumulation: int, world_size: int, identity: dict[str, Any] | None = None, resumes: list | None = None
    ):
        from hf_lora_recipe.training.run_identity import IDENTITY, RESUMES

        self.state = {
            "gradient_accumulation_steps": accumulation,
            "world_size": world_size,
            **({IDENTITY: identity} if identity is not None else {}),
            RESUMES: resumes or [],
        }

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                marker = checkpoint / RUN_STATE
                text = json.dumps({**self.state, "global_step": state.global_step}) + "\n"
                write_text_atomically(marker, text, partial=marker.with_name(RUN_STATE + ".partial"))


class NonFiniteGuard(TrainerCallback):
    """Stops at the first NaN/Inf gradient, before the optimizer can write it into the adapter.

    A NaN or Inf loss makes the gradients non-finite too, so one check covers both. DDP has averaged the
    gradients already, so every rank stops at the same step.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # one device->host read for all of them (a check per tensor would stall the GPU once per LoRA matrix)
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)).item():
            last = latest_complete_checkpoint(args.output_dir)
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
    """ZeRO-3 and some FSDP setups save empty or unsharded-placeholder adapters: refuse to publish one. The init
    checks its own saved config (:meth:`LoraInit.check_saved`) and says which layers have a rank of their own."""
    from safetensors import safe_open

    from hf_lora_recipe.inits import init_for

    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"no adapter_model.safetensors in {directory}")
    init = init_for(recipe)
    rank = init.rank_factor * recipe.lora_r
    ranks = init.check_saved(directory, recipe)
    nonzero_b = False
    # a parameter target's factors hold r per expert: (r x experts, in) and (out, r x experts)
    per_expert = tuple(f".{target.rsplit('.', 1)[0]}" for target in recipe.lora_target_parameters)
    with safe_open(str(path), framework="pt") as tensors:
        names = list(tensors.keys())
        if not names:
            raise RuntimeError(f"{path} holds no tensors (the ZeRO-3 empty-adapter failure)")
        for name in names:
            tensor = tensors.get_tensor(name)
            # train_template_tokens saves whole embedding rows; DoRA one magnitude per output row
            low_rank = "trainable_tokens" not in name and "lora_magnitude_vector" not in name
            module = name.removeprefix("base_model.model.").split(".lora_", 1)[0]
            expected = ranks.get(module, rank)
            shaped = (
                any(size % expected == 0 for size in tensor.shape)
                if per_expert and module.replace(".base_layer", "").endswith(per_expert)
                else expected in tensor.shape
            )
            if tensor.numel() == 0 or (low_rank and not shaped):
                raise RuntimeError(f"{path}: {name} has shape {tuple(tensor.shape)}, not a rank-{expected} factor")
            if "lora_B" in name and bool(tensor.abs().sum() > 0):
                nonzero_b = True
    if trained_steps > 0 and not nonzero_b:
        raise RuntimeError(f"{path}: every lora_B is zero after {trained_steps} steps: the adapter was not gathered")
