"""TRL internals. Checked on trl 1.16.0."""

from __future__ import annotations

from typing import Any


def score_every_position() -> None:
    """TRL's fused LM head indexes the supervised positions when ``trl.trainer.utils._use_triton`` says so: a data-
    dependent size the host must read, so the GPU drains every micro-batch. Scoring every position keeps shapes
    known in advance (ignored positions are zeroed before the loss either way). TRL reads the switch from its
    module at call time; its Triton kernels (chosen in trl.kernels) are untouched."""
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_use_triton"):
        raise RuntimeError("trl.trainer.utils has no _use_triton: the fused-loss path needs updating for this TRL")
    trl_utils._use_triton = lambda device: False


def set_train_metric(trainer: Any, name: str, value: float) -> None:
    """Put a value where SFTTrainer's ``log`` averages its own training metrics (``_metrics["train"]``), so what
    we sum on the device is logged under TRL's names (mean_token_accuracy, entropy)."""
    trainer._metrics["train"][name] = [value]
