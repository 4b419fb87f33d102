"""Keep the console ours: upstream notices that a user can do nothing about, filtered one by one.

Each filter names the message and the module that emits it, never a blanket ``ignore``: a new warning
from any library still shows. Warnings that our own calls caused are fixed where we make the call
(e.g. ``activation_checkpointing`` instead of ``gradient_checkpointing`` in ``trainer`` and ``modeling``),
not filtered here.
"""

from __future__ import annotations

import logging
import re
import warnings


# (message regex, category, module regex): each one comes from a library's internals, not from our calls.
FILTERS: list[tuple[str, type[Warning], str]] = [
    # PEFT's PeftModel.__init__ probes `model.is_gradient_checkpointing`, renamed in transformers 5.24.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # bitsandbytes' import runs torch.compile, which loads torch.utils.mkldnn's jit-scripted classes.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit\._script"),
]


# (logger name, message regex): notices libraries log about their own defaults.
LOG_FILTERS: list[tuple[str, str]] = [
    # merge dequantizes the NF4 base in its compute dtype on purpose; transformers narrates the cast.
    ("transformers.integrations.bitsandbytes", r"The modules are dequantized in \S+ and casted to \S+\.$"),
    # On AVX512-BF16 CPUs, `import bitsandbytes` looks for the optional `kernels` package and says so once per
    # process (per rank). Only effective when installed before peft/trl import bitsandbytes: the `command`
    # wrapper calls quiet_libraries() first thing.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
]


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_libraries() -> None:
    """Install the filters; idempotent, called by every command before it imports a library."""
    for message, category, module in FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))
