"""Our console lines: ``[hf-lora-recipe] ...`` from the main process only, or from every rank when asked.

Every module logs through here, so a multi-process launch prints each message once and a reader can tell
our lines from the libraries'. Rank comes from the launcher's environment (``RANK``), which torchrun and
``accelerate launch`` set before our code runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any


PREFIX = "[hf-lora-recipe]"


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's device index on its node (``LOCAL_RANK``, set by torchrun and accelerate launch)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def first_line(error: BaseException) -> str:
    """An error's first line, for a one-line message (its type when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def _line(stream: Any, text: str) -> None:
    """One write per line: launchers run the processes unbuffered (PYTHONUNBUFFERED), where print's separate
    write of the newline lets another rank's line land in the middle of this one."""
    stream.write(text + "\n")
    stream.flush()


def info(message: str) -> None:
    """A progress or result line, printed once (by the main process)."""
    if is_main_process():
        _line(sys.stdout, f"{PREFIX} {message}")


def warn(message: str) -> None:
    """Something the user should know that does not stop the run, on stderr, printed once."""
    if is_main_process():
        _line(sys.stderr, f"{PREFIX} warning: {message}")


def every_rank(message: str) -> None:
    """A line each process prints, tagged with its rank (e.g. what data each rank read)."""
    _line(sys.stdout, f"[hf-lora-recipe rank {rank()}/{world_size()}] {message}")
