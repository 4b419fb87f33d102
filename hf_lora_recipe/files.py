"""Writes a reader never sees half done: written beside the target, then renamed onto it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], object], partial: Path | None = None) -> Path:
    """``write(partial)``, then rename the partial file or folder onto ``target`` (a folder replaced whole).

    ``partial`` defaults to a sibling named for this process; a leftover of a run that died mid-write is removed
    first."""
    partial = partial or target.with_name(f".{target.name}.{os.getpid()}.partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    write(partial)
    if target.is_dir() and not target.is_symlink():
        replace_directory(partial, target)
    else:
        os.replace(partial, target)
    return target


def write_text_atomically(target: Path, text: str, partial: Path | None = None) -> Path:
    return write_atomically(target, lambda path: path.write_text(text), partial)


def replace_directory(staging: Path, output: Path) -> None:
    """Put ``staging`` at ``output`` by renames only: readers see the old folder or the new one, never half."""
    if output.exists():
        # an empty folder of our own to rename onto: never collides with a leftover of an earlier crash
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, retired)
        os.replace(staging, output)
        shutil.rmtree(retired)
    else:
        os.replace(staging, output)
