"""datasets internals. Checked on datasets 5.2.0."""

from __future__ import annotations

from typing import Any


def fingerprint(dataset: Any) -> str:
    """The fingerprint datasets keys its cache on (``Dataset._fingerprint``; no public accessor)."""
    return dataset._fingerprint


def memory_mapped_dataset(arrow_file: str, fingerprint: str) -> Any:
    """A Dataset over an Arrow file we wrote, memory-mapped (``datasets.table.MemoryMappedTable``): the rows are
    read from disk as used, as datasets' own cache files are."""
    import datasets
    from datasets.table import MemoryMappedTable

    return datasets.Dataset(MemoryMappedTable.from_file(arrow_file), fingerprint=fingerprint)


def in_memory_dataset(table: Any, fingerprint: str) -> Any:
    import datasets
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table), fingerprint=fingerprint)


def is_unknown_split_error(error: ValueError) -> bool:
    """``load_dataset(split=...)`` names an unknown split in a ValueError's text (no error class of its own)."""
    return "split" in str(error).lower()
