"""``per_device_train_batch_size: auto``: the largest micro-batch that divides the global batch and fits memory.

On a GPU the seed's 4 x 512 tokens leave the device waiting on the host (a step at 1, 2 or 4 x 512 takes about
the same time: benchmarks/RESULTS.md), so a larger micro-batch with less accumulation is nearly free speed. The
global batch, and with it the learning rate and schedule, stay as the recipe says; only how it is split changes.

"Fits" is `plan`'s memory model (its accuracy against measured peaks: docs/plan.md), checked against
``memory_budget_gb`` or, by default, 90% of the GPU's free memory (on a CPU half the available RAM: the model
counts a GPU's buffers, and a CPU run shares its RAM with everything else).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.planning.estimates import GIB
from hf_lora_recipe.recipe.schema import AUTO, Recipe, RecipeError


GPU_SHARE, RAM_SHARE = 0.9, 0.5


@dataclass(frozen=True)
class MicroBatch:
    size: int
    planned_bytes: int
    budget_bytes: int
    budget_source: str

    def line(self) -> str:
        return (
            f"micro-batch auto -> {self.size}: planned peak {self.planned_bytes / GIB:.2f} GiB within "
            f"{self.budget_bytes / GIB:.2f} GiB ({self.budget_source})"
        )


def memory_budget(recipe: Recipe) -> tuple[int, str]:
    """Bytes auto may plan for, and where the figure came from."""
    import torch

    if recipe.memory_budget_gb is not None:
        return int(recipe.memory_budget_gb * GIB), "memory_budget_gb"
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(log.local_rank())
        return int(GPU_SHARE * free), f"{GPU_SHARE:.0%} of the GPU's free memory"
    return int(RAM_SHARE * available_ram()), f"{RAM_SHARE:.0%} of the available RAM"


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def resolve(
    recipe: Recipe, world_size: int, shape: Any | None = None, across_ranks: bool = True
) -> tuple[Recipe, MicroBatch | None]:
    """The recipe with a number for ``per_device_train_batch_size`` (unchanged when it already has one).
    ``across_ranks`` false: this process's choice alone (a launcher checking before its processes exist)."""
    if recipe.per_device_train_batch_size != AUTO:
        return recipe, None
    from hf_lora_recipe.distributed.engines import current_engine
    from hf_lora_recipe.model.loading import model_config
    from hf_lora_recipe.planning.estimates import largest_fitting_micro_batch, measure_shape, memory

    if recipe.global_batch_size % world_size:
        raise RecipeError(
            f"global_batch_size {recipe.global_batch_size} is not a whole multiple of the world size "
            f"{world_size}; choose a global batch or process count that divides it"
        )
    shape = shape or measure_shape(model_config(recipe), recipe)
    strategy = current_engine().plan_strategy
    budget, source = memory_budget(recipe)
    size = largest_fitting_micro_batch(shape, recipe, budget, world_size, strategy)
    if size is None:
        smallest = memory(shape, recipe, 1, world_size, strategy).total
        raise RecipeError(
            f"per_device_train_batch_size auto: even a micro-batch of 1 is planned at "
            f"{smallest / GIB:.2f} GiB, over the {budget / GIB:.2f} GiB budget ({source}); "
            "raise memory_budget_gb, lower max_length, or turn gradient_checkpointing on"
        )
    if world_size > 1 and across_ranks:
        size = smallest_over_ranks(size)
    planned = memory(shape, recipe, size, world_size, strategy).total
    return dataclasses.replace(recipe, per_device_train_batch_size=size), MicroBatch(size, planned, budget, source)


def smallest_over_ranks(size: int) -> int:
    """Every process must train the same micro-batch: free memory differs a little from GPU to GPU, so the
    smallest choice wins (a divisor of the per-process batch, as every candidate is)."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    chosen = torch.tensor([size], device=state.device)
    dist.all_reduce(chosen, op=dist.ReduceOp.MIN)
    return int(chosen.item())
