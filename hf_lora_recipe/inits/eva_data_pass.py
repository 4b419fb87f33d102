"""EVA's data pass (``init_lora_weights: eva``), the step ``train`` runs once the trainer exists: see
:mod:`hf_lora_recipe.inits.eva` for the method, what is proven and what is saved. It drives the adapter's steps
(``inits/adapter.py``), which themselves run EVA's proof: apart from the init's class, so neither imports the other
in a cycle."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.inits.eva_state import (
    apply_state,
    check_checkpoint_shapes,
    check_same_on_every_process,
    eva_state_path,
    load_state,
    ranks,
    save_state,
)
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


# Forward passes PEFT may run (the first, which finds layers with identical inputs, included). The tiny test
# model converges in 46 (r 4) to 117 (r 16) micro-batches of 4 x 64 tokens, 33 (r 4) with two DDP processes. With
# no backward a pass costs about a third of a training micro-step (plus the SVD updates of the layers not yet
# converged), so the cap is about 70 micro-steps' worth of compute.
MAX_BATCHES = 200


def initialize_eva(trainer: Any, recipe: Recipe, checkpoint: str | None) -> None:
    """Set A and the ranks from the training data (a fresh start, saving them) or from ``eva_state/`` (a resumed
    run, checked against ``checkpoint``'s shapes), then prove the result."""
    from hf_lora_recipe.inits.adapter import check_variants, finish_adapter
    from hf_lora_recipe.model.loading import count_parameters, trainable_line

    model = trainer.model
    modules = len(ranks(model))  # every target still has its rank-r adapter: EVA's budget is r for each
    with _random_states_kept():  # the pass's sampler and PEFT's re-created layers draw: not from training's streams
        state = load_state(recipe) if checkpoint else data_pass(trainer)
        apply_state(model, state)
    finish_adapter(model, recipe)
    check_variants(model, recipe, before=modules)
    check_same_on_every_process(model)
    if checkpoint:
        check_checkpoint_shapes(model, checkpoint, recipe)
    elif log.is_main_process():
        save_state(state, recipe)
    log.info(rank_line(model, modules) + (f" (loaded from {eva_state_path(recipe)})" if checkpoint else ""))
    log.info(trainable_line(*count_parameters(model)))


def data_pass(trainer: Any) -> dict[str, Any]:
    """PEFT's EVA state (module name -> A, rank 0 included) from at most :data:`MAX_BATCHES` of the trainer's
    training batches; the pass's dataloader is dropped after (see the module docstring)."""
    from peft.tuners.lora.eva import get_eva_state_dict

    model = trainer.model
    dataloader = trainer.get_train_dataloader()
    batches, forward = _Batches(dataloader, MAX_BATCHES), _Forward(MAX_BATCHES)
    was_training = model.training
    try:
        with warnings.catch_warnings():
            # gathering every process's inputs is the point under DDP (each reads its own shard); the int fields of
            # a padding-free batch (max_length_q, ...) are not moved to the device, nor need to be
            warnings.filterwarnings(
                "ignore", message="torch.distributed is initialized and `gather_distributed_inputs"
            )
            warnings.filterwarnings("ignore", message="input of type <class 'int'> could not be moved")
            state = get_eva_state_dict(
                model, dataloader=batches, forward_fn=forward, show_progress_bar=log.is_main_process()
            )
    except _NotConverged:
        moving = _remove_eva_hooks(model)
        raise RecipeError(
            f"init_lora_weights: eva: the input components of {len(moving)} layer(s) (e.g. {moving[0]}) were still "
            f"moving after {MAX_BATCHES} batches of training data (PEFT's tau 0.99); give each batch more supervised "
            "tokens (a larger per_device_train_batch_size or max_length), lower lora_r, or use init_lora_weights "
            "true"
        ) from None
    finally:
        model.train(was_training)
        _forget(trainer, dataloader)
    log.info(
        f"EVA: every layer's top input components converged after {forward.calls} forward passes "
        f"({batches.read} training batches read, cap {MAX_BATCHES})"
    )
    return {name: tensor.detach().float().cpu().contiguous() for name, tensor in state.items()}


class _NotConverged(Exception):
    """Raised out of PEFT's loop, which cycles the data until convergence with no limit of its own."""


class _Forward:
    """PEFT's ``forward_fn``: the model on one training batch as the trainer calls it (no KV cache, so
    padding-free rows stay apart), at most ``limit`` times. Only the layers' inputs are wanted: no loss, and the
    logits of one position where the model allows it (training's fused LM head never holds the batch x length x
    vocabulary logits, so a micro-batch sized for training need not fit them)."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, 0
        self.last: dict[str, int] | None = None

    def __call__(self, model: Any, inputs: dict[str, Any]) -> Any:
        if self.calls == self.limit:
            raise _NotConverged
        self.calls += 1
        if self.last is None:
            import inspect

            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            known = inspect.signature(type(base).forward).parameters
            self.last = {"logits_to_keep": 1} if "logits_to_keep" in known else {}
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, **self.last)


class _Batches:
    """At most ``limit`` batches of ``dataloader``, read afresh on each pass (PEFT replays the first pass's)."""

    def __init__(self, dataloader: Any, limit: int):
        self.dataloader, self.limit, self.read = dataloader, limit, 0

    def __len__(self) -> int:  # PEFT checks that there is data
        try:
            return min(len(self.dataloader), self.limit)
        except TypeError:
            return self.limit

    def __iter__(self) -> Iterator[Any]:
        for batch in itertools.islice(self.dataloader, self.limit):
            self.read += 1
            yield batch


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    """Python's, NumPy's, torch's CPU and every CUDA device's random states as they were before."""
    import random

    import numpy as np
    import torch

    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _forget(trainer: Any, dataloader: Any) -> None:
    """Drop the pass's dataloader from accelerate's records: a DataLoaderShard left mid-iteration stays registered
    as an active dataloader (whose end decides gradient syncs), and the accelerator lists every prepared one."""
    from hf_lora_recipe.upstream.accelerate import forget_dataloader

    if hasattr(dataloader, "end"):
        dataloader.end()
    forget_dataloader(trainer.accelerator, dataloader)


def _remove_eva_hooks(model: Any) -> list[str]:
    """Remove the hooks PEFT left when its loop was stopped; returns the layers still fitting (not converged)."""
    from hf_lora_recipe.upstream.peft import remove_eva_hooks

    return remove_eva_hooks(model) or ["?"]


def rank_line(model: Any, modules: int) -> str:
    config = model.peft_config[model.active_adapter]
    values = list(ranks(model).values())
    dropped = modules - len(values)
    return (
        f"EVA ranks: min {min(values)}, max {max(values)}, total {sum(values)} over {len(values)} layers "
        f"(budget r {config.r} x {modules} modules, at most {round(config.eva_config.rho * config.r)} per layer"
        + (f"; {dropped} layer(s) got rank 0 and no adapter" if dropped else "")
        + ")"
    )
