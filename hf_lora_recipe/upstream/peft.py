"""PEFT internals. Checked on peft 0.21.2."""

from __future__ import annotations

from typing import Any

from .torch import remove_forward_hooks


def remove_eva_hooks(model: Any) -> list[str]:
    """Remove the forward hooks PEFT's EVA pass registers (``peft.tuners.lora.eva._Hook``; it keeps no handles
    when its loop is stopped early); returns the names of layers whose SVD was still being fitted."""
    from peft.tuners.lora.eva import SVDHook, _Hook

    fitting = []
    for name, module in model.named_modules():
        removed = remove_forward_hooks(module, _Hook)
        if any(isinstance(hook, SVDHook) for hook in removed):
            fitting.append(name.replace("base_model.model.", "", 1))
    return fitting
