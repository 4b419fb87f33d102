"""transformers internals.

Checked on transformers 5.24.0 and 5.25.0.
"""

from __future__ import annotations

import os
from typing import Any


def attention_implementation(model: Any) -> str:
    """The attention a loaded model dispatches to: its config's ``_attn_implementation``, the name
    ``from_pretrained(attn_implementation=...)`` resolved and the attention layers read (no public accessor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(base.config._attn_implementation)


def registered_attention() -> set[str]:
    """The names ``from_pretrained(attn_implementation=...)`` accepts without a Hub kernel: transformers' attention
    registry (``ALL_ATTENTION_FUNCTIONS``, whose ``valid_keys`` leaves out its built-in eager) and eager."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}


def supports_sdpa(model: Any) -> bool:
    """Whether the model's class runs ``attn_implementation="sdpa"`` (``_supports_sdpa``, what from_pretrained checks
    before refusing sdpa; Gemma 2 and gpt-oss say no: softcapping and attention sinks)."""
    if not hasattr(type(model), "_supports_sdpa"):
        raise RuntimeError("transformers' PreTrainedModel has no _supports_sdpa: supports_sdpa needs updating")
    return bool(type(model)._supports_sdpa)


class AfterCheckpoint:
    """A Trainer mixin: ``after_checkpoint(folder)`` runs on every process right after ``Trainer._save_checkpoint``
    wrote a checkpoint (before ``on_save`` callbacks, and before the folder could be rotated away), with the folder
    from ``Trainer._get_output_dir`` (hyperparameter search's trial folders included)."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from pathlib import Path

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        self.after_checkpoint(folder)

    def after_checkpoint(self, folder: Any) -> None:
        raise NotImplementedError


# AutoConfig raises ValueError/KeyError/OSError with these phrases; there is no error class per cause.
def names_unknown_architecture(error: BaseException) -> bool:
    return "does not recognize this architecture" in str(error) or "Unrecognized model" in str(error)


def names_no_model_type(error: BaseException) -> bool:
    return "Unrecognized model" in str(error)


def named_model_type(error: BaseException) -> str | None:
    import re

    named = re.search(r"model type `([^`]+)`", str(error))
    return named.group(1) if named else None


def asks_for_remote_code(error: BaseException) -> bool:
    return "trust_remote_code" in str(error)


# tokenizers (Rust) raises a bare Exception for an I/O failure of a fast tokenizer's save, its text ending
# "(os error N)" (checked on tokenizers 0.22): as an OSError, a full disk is reported like any other write.
def tokenizers_os_error(error: Exception, filename: str) -> OSError | None:
    import re

    found = re.search(r"\(os error (\d+)\)\s*$", str(error))
    if type(error) is not Exception or not found:
        return None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), filename)


def enable_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    """Activation checkpointing on, by its current name: ``activation_checkpointing_enable`` from transformers
    5.24 (the old name warns there), ``gradient_checkpointing_enable`` before it (5.17, the GPU image's)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
