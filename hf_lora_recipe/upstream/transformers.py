"""transformers internals.

Checked on transformers 5.24.0 and 5.25.0.
"""

from __future__ import annotations

from typing import Any


def attention_implementation(model: Any) -> str:
    """The attention a loaded model dispatches to: its config's ``_attn_implementation``, the name
    ``from_pretrained(attn_implementation=...)`` resolved and the attention layers read (no public accessor)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(base.config._attn_implementation)
