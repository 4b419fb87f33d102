"""Keep the console ours: upstream notices that a user can do nothing about, filtered one by one.

Each filter names the message and the module that emits it, never a blanket ``ignore``: a new warning
from any library still shows. Warnings that our own calls caused are fixed where we make the call
(e.g. ``activation_checkpointing`` instead of ``gradient_checkpointing`` in ``trainer`` and ``modeling``),
not filtered here.
"""

from __future__ import annotations

import warnings

# (message regex, category, module regex): each one comes from a library's internals, not from our calls.
FILTERS: list[tuple[str, type[Warning], str]] = [
    # PEFT's PeftModel.__init__ probes `model.is_gradient_checkpointing`, renamed in transformers 5.24.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
]


def quiet_libraries() -> None:
    """Install the filters; idempotent, called at the start of every command that loads a model."""
    for message, category, module in FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
