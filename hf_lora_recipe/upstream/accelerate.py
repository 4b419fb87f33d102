"""accelerate internals. Checked on accelerate 1.15.0 and 1.16.0."""

from __future__ import annotations

import functools
from typing import Any


def let_fsdp_state_run_on_cpu() -> None:
    """accelerate enables FSDP only for accelerator backends: on CPU processes it leaves the state at ``MULTI_CPU``
    and wraps the model in DDP, with no message. torch's FSDP2 itself runs on CPU (``fully_shard`` over gloo), so
    once accelerate has built the state it is set to FSDP, in the instance and in the shared state every later
    ``PartialState`` reads (``PartialState._shared_state``). Idempotent."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "lets_fsdp_run_on_cpu", False):
        return
    shared = PartialState._shared_state

    @functools.wraps(original)
    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = shared["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init.lets_fsdp_run_on_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init


def forget_dataloader(accelerator: Any, dataloader: Any) -> None:
    """Drop a prepared dataloader from the accelerator's list of them (``Accelerator._dataloaders``): one left
    mid-iteration would otherwise stay registered, and accelerate decides gradient syncs by its end."""
    prepared = accelerator._dataloaders
    prepared[:] = [entry for entry in prepared if entry is not dataloader]
