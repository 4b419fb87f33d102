"""Writes a reader never sees half done (written beside the target, then renamed onto it), and where our cache lives."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


CACHE_ENV = "HF_LORA_RECIPE_CACHE"


def write_atomically(target: Path, write: Callable[[Path], object], partial: Path | None = None) -> Path:
    """``write(partial)``, then rename the partial file or folder onto ``target`` (a folder replaced whole).

    ``partial`` defaults to a sibling named for this process; a leftover of a run that died mid-write is removed
    first."""
    partial = partial or target.with_name(f".{target.name}.{os.getpid()}.partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    try:
        write(partial)
    except BaseException:  # a full disk, an interrupt: the target stays as it was, and so does the folder
        _remove(partial)
        raise
    if target.is_dir() and not target.is_symlink():
        replace_directory(partial, target)
    else:
        os.replace(partial, target)
    return target


def file_sha256(path: Path) -> str:
    """A file's sha256 (hex), read in blocks."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(target: Path, text: str, partial: Path | None = None) -> Path:
    return write_atomically(target, lambda path: path.write_text(text, encoding="utf-8"), partial)


def write_texts_atomically(texts: dict[Path, str]) -> None:
    """Several files changed together: every new text written beside its file first, then all renamed into place
    (renames need no space), so a failure leaves every file as it was."""
    partials = {target: target.with_name(f".{target.name}.{os.getpid()}.partial") for target in texts}
    try:
        for target, text in texts.items():
            partials[target].write_text(text, encoding="utf-8")
    except BaseException:
        for partial in partials.values():
            _remove(partial)
        raise
    for target, partial in partials.items():
        os.replace(partial, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, the file-size limit, the user's quota


def disk_full_line(error: OSError) -> str | None:
    """The one line for a write the disk refused, or None for any other error."""
    if error.errno not in DISK_FULL:
        return None
    where = f" writing {error.filename}" if error.filename else ""
    return (
        f"the disk refused a write{where} ({os.strerror(error.errno)}): files being replaced are kept as they were "
        "and an unfinished checkpoint is set aside on the next run; free space (or raise the limit) and rerun"
    )


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


def cache_root() -> Path:
    """``$HF_LORA_RECIPE_CACHE``, else ``$XDG_CACHE_HOME/hf-lora-recipe``, else ``~/.cache/hf-lora-recipe``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: a relative value is to be ignored
        return Path(xdg) / "hf-lora-recipe"
    return Path.home() / ".cache" / "hf-lora-recipe"
