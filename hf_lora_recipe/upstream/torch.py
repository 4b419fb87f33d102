"""PyTorch internals: compiling a module's call in place, and dynamo's own record of what it compiled.

Checked on torch 2.13.0 (CPU build).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.exc
import torch._dynamo.utils


# What dynamo raises when a fullgraph compile meets code it cannot put in one graph, or the backend fails.
COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)


def module_call(module: torch.nn.Module) -> Callable[..., Any]:
    """What ``nn.Module.compile`` compiles: the module's ``_call_impl`` (forward plus its hooks)."""
    return module._call_impl


def set_compiled_call(module: torch.nn.Module, call: Callable[..., Any]) -> None:
    """Route ``module(...)`` through ``call``, as ``nn.Module.compile`` does with its compiled ``_call_impl``."""
    if not hasattr(module, "_compiled_call_impl"):
        raise RuntimeError("torch.nn.Module has no _compiled_call_impl: compile_decoder_layers needs updating")
    module._compiled_call_impl = call


def compiled_call(module: torch.nn.Module) -> Callable[..., Any] | None:
    return getattr(module, "_compiled_call_impl", None)


def graphs_compiled() -> int:
    """How many distinct graphs dynamo has compiled in this process (its own statistics counter)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# transformers >= 5.25 depends on the `kernels` package, whose `use_kernelized_func` wraps each attention
# forward in a context-variable set/reset. Under a compiled non-reentrant checkpoint that global write is a
# "side effect inside a HOP", and dynamo falls back to eager for the whole layer. The write is undone before
# the forward returns and the recomputation in the backward replays the traced graph, so not replaying it
# there is exact. torch >= 2.10 has the switch.
_CHECKPOINT_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def checkpoint_side_effects_allowed() -> contextlib.AbstractContextManager[None]:
    if not hasattr(torch._dynamo.config, _CHECKPOINT_SIDE_EFFECTS):
        raise RuntimeError(
            f"torch._dynamo.config has no {_CHECKPOINT_SIDE_EFFECTS}: compile_decoder_layers needs updating"
        )
    return torch._dynamo.config.patch(**{_CHECKPOINT_SIDE_EFFECTS: True})


@contextlib.contextmanager
def fresh_dynamo_counters() -> Iterator[None]:
    """Dynamo's statistics cleared for the block and restored after it (tests of the compile proof)."""
    saved = {name: dict(values) for name, values in torch._dynamo.utils.counters.items()}
    torch._dynamo.utils.counters.clear()
    try:
        yield
    finally:
        torch._dynamo.utils.counters.clear()
        for name, values in saved.items():
            torch._dynamo.utils.counters[name].update(values)


def remove_forward_hooks(module: torch.nn.Module, kind: type) -> list[Any]:
    """Remove the forward hooks of ``module`` that are instances of ``kind`` (hooks registered by a library that
    kept no handle to them); returns the removed hooks."""
    hooks = module._forward_hooks
    removed = [hook for hook in hooks.values() if isinstance(hook, kind)]
    for key in [key for key, hook in hooks.items() if isinstance(hook, kind)]:
        del hooks[key]
    return removed


def scale_by_mask(values: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``values * keep * scale`` in one pass, ``keep`` a bool tensor: ATen's ``native_dropout_backward``, the op
    ``torch.nn.functional.dropout``'s own gradient runs (no public name does this without a float copy of the mask)."""
    op = getattr(torch.ops.aten, "native_dropout_backward", None)
    if op is None:
        raise RuntimeError("torch.ops.aten has no native_dropout_backward: training/lora_dropout.py needs updating")
    return op(values, keep, scale)
