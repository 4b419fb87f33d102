"""The gguf package (gguf-py): reading a GGUF's metadata, and rewriting a file with keys added. Checked on gguf 0.19.0."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key-value field of the GGUF at ``path`` (tensor data is memory-mapped, not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def add_metadata(path: Path, values: dict[str, str | int], scratch: Path) -> None:
    """Rewrite the GGUF at ``path`` with ``values`` set (strings and unsigned ints), through gguf-py's own
    ``gguf-new-metadata`` copy (``gguf.scripts.gguf_new_metadata.copy_with_new_metadata``, not exported by the
    package's ``__init__``), renamed onto ``path`` when complete."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    kinds = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32}
    details = {key: MetadataDetails(kinds[type(value)], value) for key, value in values.items()}
    reader = gguf.GGUFReader(str(path))
    target = scratch / f"{path.name}.with-metadata"
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(str(target), arch=arch.contents() if arch else "llama", endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    copy_with_new_metadata(reader, writer, details, remove_metadata=[])
    del reader  # its memory map of ``path``
    os.replace(target, path)
