"""What each rank holds after its first optimizer step, by plan's components, next to plan's figures.

Plan predicts bytes per GPU for DDP, FSDP and ZeRO-3 (``estimates.memory``); here the tensors themselves are
counted on every rank: the local shard of an FSDP2 ``DTensor``, ZeRO-3's partition (``ds_tensor``), the
optimizer's states and, under DeepSpeed, the fp32 master partitions it steps on.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from hf_lora_recipe.distributed.engines import Engine


def _local(tensor: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return getattr(tensor, "ds_tensor", tensor)  # ZeRO-3 keeps this rank's partition beside an empty .data


def _bytes(tensor: Any) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()


def rank_holdings(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of the tensors this rank holds, by plan's components: 4-bit weights (packed, with their
    quantization constants), other frozen weights, adapter, gradients, optimizer states."""
    quantized_weights = set()
    constants = 0
    for module in model.modules():
        state = getattr(module, "quant_state", None)  # bitsandbytes keeps it on the module too (FSDP2 drops it
        if state is not None and hasattr(module, "weight"):  # from the parameter it shards)
            quantized_weights.add(id(module.weight))
            constants += sum(_bytes(t) for t in (state.absmax, state.code))
            if state.nested:
                constants += sum(_bytes(t) for t in (state.state2.absmax, state.state2.code, state.offset))
    held = {"quantized_weights": constants, "unquantized_weights": 0, "adapter": 0, "gradients": 0, "optimizer": 0}
    params = list(model.parameters())
    for param in params:
        kind = (
            "quantized_weights"
            if id(param) in quantized_weights
            else "adapter"
            if param.requires_grad
            else "unquantized_weights"
        )
        held[kind] += _bytes(param)
        if param.grad is not None:
            held["gradients"] += _bytes(param.grad)
    optimizer_bytes, master_gradients = optimizer_holdings(optimizer, {id(p) for p in params})
    held["optimizer"] = optimizer_bytes
    held["gradients"] += master_gradients
    return held


HOLDINGS = {
    "quantized_weights": "4-bit weights",
    "unquantized_weights": "other weights",
    "adapter": "adapter",
    "gradients": "gradients",
    "optimizer": "optimizer states",
}


def holdings_line(held: dict[str, int], planned: dict[str, int], engine: Engine, world_size: int) -> str:
    """``holds after step 1 (MiB, held/planned for FSDP2 on 2): 4-bit weights 0.061/0.061, ...``."""
    mib = 1024**2
    parts = ", ".join(f"{name} {held[key] / mib:.4f}/{planned[key] / mib:.4f}" for key, name in HOLDINGS.items())
    return f"holds after step 1 (MiB, held/planned for {engine} on {world_size}): {parts}"


def _innermost(optimizer: Any) -> Any:
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer  # accelerate's wrapper, then DeepSpeed's ZeRO optimizer
    return optimizer


def optimizer_holdings(optimizer: Any, model_params: set[int]) -> tuple[int, int]:
    """(optimizer-state bytes, gradient bytes) the torch optimizer keeps beyond the model's own tensors: its
    states and the parameters it steps on that are not the model's (ZeRO-2's fp32 master partitions; ZeRO-3
    keeps its masters in buffers of its own, not counted here), with their gradients."""
    import torch

    inner = _innermost(optimizer)
    states = sum(
        _bytes(value) for state in inner.state.values() for value in state.values() if isinstance(value, torch.Tensor)
    )
    masters = gradients = 0
    for group in inner.param_groups:
        for param in group["params"]:
            if id(param) not in model_params:
                masters += _bytes(param)
                if param.grad is not None:
                    gradients += _bytes(param.grad)
    return states + masters, gradients


class HoldingsReport(TrainerCallback):
    """After the first optimizer step, each rank prints the bytes it holds next to plan's figures for this
    engine and world size (gradients are still there: the step has not zeroed them yet)."""

    def __init__(self, planned: Any, engine: Engine, world_size: int):
        self.planned = {key: getattr(planned, key) for key in HOLDINGS}
        self.engine, self.world_size = engine, world_size
        self.done = False

    def on_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.done or model is None or optimizer is None:
            return
        self.done = True
        from hf_lora_recipe import log

        log.every_rank(holdings_line(rank_holdings(model, optimizer), self.planned, self.engine, self.world_size))
