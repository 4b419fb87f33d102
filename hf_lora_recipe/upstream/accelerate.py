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


def launch_environment(config_file: str, num_processes: int | None) -> tuple[dict[str, str], int]:
    """The engine variables ``accelerate launch --config_file`` gives its processes, and the world size: computed
    in the launching process, so the launch can be checked before any process starts. accelerate resolves a
    config file in ``_validate_launch_command`` (private: no public equivalent) and exports it with
    ``prepare_multi_gpu_env``; for DeepSpeed its launcher exports the ZeRO stage as below."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", config_file, *(["--num_processes", str(num_processes)] if num_processes else [])]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "-m", "hf_lora_recipe.train"]))
    world_size = int(args.num_processes or 1) * int(args.num_machines or 1)
    if args.use_deepspeed:
        stage = getattr(args, "zero_stage", None)
        environment = {"ACCELERATE_USE_DEEPSPEED": "true"}
        if stage is not None:
            environment["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(stage)
        if getattr(args, "deepspeed_config_file", None):
            environment["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(args.deepspeed_config_file)
        return environment, world_size
    if world_size == 1 and not args.use_fsdp:
        return {}, 1
    return dict(prepare_multi_gpu_env(args)), world_size
