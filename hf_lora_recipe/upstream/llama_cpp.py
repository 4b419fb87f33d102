"""llama.cpp: its converters (``convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``, run as scripts) and its Python
bindings (``llama_cpp``). Checked on llama-cpp-python 0.3.36 (its vendored llama.cpp and gguf-py 0.19.0).

The converters are not in llama-cpp-python's wheel, only in its source package (shipping/gguf_export.py finds
or fetches them).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


CONVERTER_VERSION = "0.3.36"  # the llama-cpp-python release whose converters this module was checked against
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
QUANTS = ("f32", "f16", "bf16", "q8_0")  # what both converters write (--outtype)


def supported_architectures(converters: Path) -> set[str]:
    """The Hugging Face architectures ``convert_hf_to_gguf.py`` converts, read from its registrations
    (``@ModelBase.register("LlamaForCausalLM", ...)``) without importing it (torch and transformers load slowly)."""
    names: set[str] = set()
    for path in sorted((converters / "conversion").glob("*.py")):
        for arguments in re.findall(r"@ModelBase\.register\((.*?)\)", path.read_text(), flags=re.DOTALL):
            names.update(re.findall(r"[\"']([A-Za-z0-9_.]+)[\"']", arguments))
    return names


def run_converter(converters: Path, script: str, arguments: Sequence[str]) -> str | None:
    """Run one converter as llama.cpp documents it, with its own gguf-py; None, or the line that says why it failed."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONWARNINGS": "ignore"}
    env.pop("NO_LOCAL_GGUF", None)  # the converters and their gguf-py are of one release
    done = subprocess.run(
        [sys.executable, str(converters / script), *arguments], capture_output=True, text=True, env=env
    )
    if not done.returncode:
        return None
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line or "Error" in line]
    return (errors or done.stderr.strip().splitlines() or ["no output"])[-1]


@contextlib.contextmanager
def loaded(model: Path, lora: Path | None, context: int) -> Iterator[Any]:
    """A llama.cpp model (with a LoRA GGUF applied at scale 1) that keeps the logits of every position; closed on
    exit (left to the garbage collector at interpreter exit, its finaliser fails on already-unloaded bindings)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model), lora_path=str(lora) if lora else None, n_ctx=context, logits_all=True, verbose=False, seed=0
    )
    try:
        yield llm
    finally:
        llm.close()


def logits(llm: Any, ids: list[int]) -> Any:
    """The next-token logits after ``ids``, evaluated from a fresh context (``Llama._scores``: the row per
    evaluated position that ``eval`` fills when ``logits_all``)."""
    llm.reset()
    llm.eval(ids)
    return llm._scores[llm.n_tokens - 1].copy()


def greedy(llm: Any, ids: list[int], stop_ids: set[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` up to a stop token (not included) or ``max_new_tokens``."""
    reply: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop_ids or len(reply) >= max_new_tokens:
            break
        reply.append(token)
    return reply
