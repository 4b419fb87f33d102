"""LoRA dropout on a CPU with its mask drawn by geometric skipping.

torch draws a CPU dropout mask one Bernoulli sample per element from its serial generator: in a SmolLM2 QLoRA step
on 2 cores that was the largest cost after the matmuls (``benchmarks/RESULTS.md``). At LoRA's rates (0.05) most
elements are kept, so the positions of the dropped ones are drawn instead: the gaps between consecutive dropped
elements of an independent Bernoulli(p) sequence are geometric(p), and drawing them (about p x n numbers) gives
exactly that sequence. The kept elements are scaled by 1 / (1 - p) as ``nn.Dropout`` scales them, and the
gradient is masked by the same bool mask (1 byte per element, as torch keeps it).

The masks come from torch's default generator, so a checkpointed layer's recomputation (which restores the
generator's state) redraws the forward's masks, and a resumed run (whose checkpoint holds the generator's
state) draws what the uninterrupted run would have. Compiled layers keep torch's dropout: the draws here are a
loop of data-dependent length.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_lora_recipe.upstream.torch import scale_by_mask


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool mask of ``shape``, each element False (dropped) independently with probability ``p``."""
    count = math.prod(shape)
    expected = count * p
    # enough gaps to pass the last element at 8 standard deviations; the loop continues the sequence otherwise
    draws = int(expected + 8 * math.sqrt(expected * (1 - p)) + 16)
    dropped = torch.empty(draws, dtype=torch.float64).geometric_(p).cumsum_(0)  # 1-based positions, exact in fp64
    while dropped[-1] <= count:
        more = torch.empty(draws, dtype=torch.float64).geometric_(p).cumsum_(0).add_(dropped[-1])
        dropped = torch.cat([dropped, more])
    keep = torch.ones(count + 1, dtype=torch.bool)  # the last one absorbs every position past the end
    keep.index_fill_(0, dropped.clamp_(max=count + 1).long().sub_(1), False)
    return keep[:count].view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return scale_by_mask(values, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return scale_by_mask(grad, keep, ctx.scale), None, None


class SkippingDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask, on a CPU tensor in training, is drawn by :func:`keep_mask`; elsewhere torch's."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or values.device.type != "cpu" or self.inplace:
            return super().forward(values)
        return _MaskedScale.apply(values, keep_mask(values.shape, self.p), 1 / (1 - self.p))


def use_skipping_dropout(model: Any) -> int:
    """Every LoRA layer's ``nn.Dropout`` becomes a :class:`SkippingDropout` of the same rate; returns how many.
    None in a model with compiled layers."""
    from peft.tuners.lora import LoraLayer

    from hf_lora_recipe.upstream.torch import compiled_call

    if any(compiled_call(module) is not None for module in model.modules()):
        return 0
    replaced = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, dropout in module.lora_dropout.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    module.lora_dropout[adapter] = SkippingDropout(dropout.p).train(dropout.training)
                    replaced += 1
    return replaced
