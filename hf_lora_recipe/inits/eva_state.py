"""EVA's state: the step-0 A of every layer saved for a resume, applied to a model, and the proof that EVA set the
adapter (see :mod:`hf_lora_recipe.inits.eva` for the method)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hf_lora_recipe.files import write_atomically
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


# A folder in output_dir, like initial_adapter/: push uploads no folder, and a file of ours at the top would mark the
# folder as holding a finished run's files (shipping/output_dir.foreign_entries)
EVA_STATE = "eva_state"
STATE_FILE = "eva_state.safetensors"
# |A A^T - I|: measured 3e-7 in fp32. Rounding unit rows to bf16 (the adapter's dtype on a 4-bit base) moves each
# entry of A A^T by at most 2 x 2^-9 ~ 4e-3 whatever the width (measured 1.2e-3). A Kaiming or Gaussian A (EVA not
# applied) is off by 0.6 or more.
ORTHONORMAL_TOLERANCE = 1e-4
ORTHONORMAL_TOLERANCE_HALF = 1e-2


def eva_state_path(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / EVA_STATE / STATE_FILE


# ---------------------------------------------------------------------------------------------- applying a state


def apply_state(model: Any, state: dict[str, Any]) -> None:
    """PEFT's ``initialize_lora_eva_weights`` from a state: A set, ranks (and alpha) per layer, rank-0 layers
    unwrapped, rank_pattern/alpha_pattern written into the adapter config."""
    from peft import initialize_lora_eva_weights

    initialize_lora_eva_weights(model, eva_state_dict=dict(state))  # PEFT empties the dict it is given


# ---------------------------------------------------------------------------------------------- proof


def check_eva(model: Any, recipe: Recipe, layers: list[tuple[str, Any]], modules: int) -> None:
    """EVA set every adapted layer (``check_variants`` already saw B = 0 and alpha/r): the config says eva, each
    layer's rank is its rank_pattern entry and at most rho x r, the ranks sum to the budget r x modules, and A's
    rows are orthonormal (the top components of an SVD; a random A is far from it)."""
    import torch

    config = model.peft_config[model.active_adapter]
    if config.init_lora_weights != "eva" or config.eva_config is None:
        raise RuntimeError(
            f"init_lora_weights eva: the adapter was built with init_lora_weights "
            f"{config.init_lora_weights}, so EVA did not set it"
        )
    most = round(config.eva_config.rho * config.r)
    total = 0
    for name, layer in layers:
        key = name.replace("base_model.model.", "", 1)
        for adapter in layer.lora_A:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            rank = config.rank_pattern.get(key, config.r)
            if a.shape[0] != rank or b.shape[1] != rank or rank > most:
                raise RuntimeError(
                    f"{name}: EVA rank {rank} in rank_pattern (at most {most}), but A is "
                    f"{tuple(a.shape)} and B {tuple(b.shape)}: the adapter is not the one EVA decided"
                )
            with torch.no_grad():
                gram = a.float() @ a.float().T
                error = (gram - torch.eye(rank, device=gram.device)).abs().max().item()
            tolerance = ORTHONORMAL_TOLERANCE if a.dtype == torch.float32 else ORTHONORMAL_TOLERANCE_HALF
            if error > tolerance:
                raise RuntimeError(
                    f"{name}: lora_A's rows are not orthonormal (|A A^T - I| {error:.2g}, tolerance "
                    f"{tolerance:g}): EVA did not set A to the layer's input components"
                )
            total += rank
    budget = config.r * modules
    if total != budget:
        raise RuntimeError(
            f"init_lora_weights eva: the layers' ranks sum to {total}, not EVA's budget r {config.r} "
            f"x {budget // config.r} modules = {budget}"
        )


def ranks(model: Any) -> dict[str, int]:
    """Each adapted layer's rank, by its name in the base (layers EVA gave rank 0 are gone)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.replace("base_model.model.", "", 1): next(iter(layer.lora_A.values())).weight.shape[0]
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
    }


def check_same_on_every_process(model: Any) -> None:
    """Under DDP every process ran the pass on the same gathered inputs, so the ranks agree; DDP copies rank 0's
    weights at wrap time, but only into identical shapes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = sorted(ranks(model).items())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        differing = next(i for i, other in enumerate(everyone) if other != mine)
        raise RuntimeError(
            f"EVA chose other ranks on process {differing} than on process {dist.get_rank()}: the "
            "processes would train differently shaped adapters"
        )


# ---------------------------------------------------------------------------------------------- saved state


def save_state(state: dict[str, Any], recipe: Recipe) -> Path:
    """``output_dir/eva_state/eva_state.safetensors``, replacing an earlier start's whole."""
    from safetensors.torch import save_file

    target = eva_state_path(recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "lora_r": str(recipe.lora_r)}
    return write_atomically(
        target,
        lambda partial: save_file(state, str(partial), metadata=metadata),
        partial=target.with_name(STATE_FILE + ".partial"),
    )


def load_state(recipe: Recipe) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = eva_state_path(recipe)
    if not path.is_file():
        raise RecipeError(
            f"{path} is missing, so the ranks EVA gave the checkpoint's adapter are unknown: pass "
            "--overwrite_output_dir true to train again from scratch"
        )
    return load_file(str(path))


def check_checkpoint_shapes(model: Any, checkpoint: str, recipe: Recipe) -> None:
    """The checkpoint's adapter has the shapes the saved EVA state gave this model (else it would not load)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(checkpoint) / "adapter_model.safetensors"
    if not path.is_file():
        return  # nothing to compare (the trainer's own loading reports it)
    expected = {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}
    with safe_open(str(path), framework="pt") as saved:
        found = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    for name in sorted(set(expected) | set(found)):
        if expected.get(name) != found.get(name):
            raise RecipeError(
                f"{path}: {name} is {found.get(name)}, but {eva_state_path(recipe)} gives this run "
                f"{expected.get(name)}: the checkpoint was not trained with that EVA state; pass "
                "--overwrite_output_dir true to train again from scratch"
            )


def saved_rank_range(output_dir: str | os.PathLike) -> tuple[int, int, int] | None:
    """(min, max, total) of the non-zero ranks in a run's saved EVA state; None when it is not there."""
    path = Path(output_dir) / EVA_STATE / STATE_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as saved:
        values = [saved.get_slice(name).get_shape()[0] for name in saved.keys()]
    values = [value for value in values if value] or [0]
    return min(values), max(values), sum(values)


def saved_ranks(directory: Path) -> dict[str, int]:
    """A saved EVA adapter's ranks that differ from r (its rank_pattern, by layer name in the base); an adapter
    config that no longer says eva, or lost the pattern, would load with the wrong shapes."""
    import json

    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    pattern = config.get("rank_pattern")
    if config.get("init_lora_weights") != "eva" or not isinstance(pattern, dict):
        raise RuntimeError(
            f"{directory}/adapter_config.json: init_lora_weights {config.get('init_lora_weights')}, "
            f"rank_pattern {pattern!r}: not the EVA adapter this run trained (its ranks would be lost)"
        )
    return pattern
