"""Where rows come from: local files (one or a directory of them) or a Hub dataset, with row provenance."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Rows:
    """A ``datasets.Dataset`` of raw rows and where each row came from, for error messages."""

    dataset: Any
    sources: list[str]  # one name per part, in order
    starts: list[int]  # index of each part's first row in ``dataset``

    def origin(self, row: int) -> str:
        part = bisect.bisect_right(self.starts, row) - 1
        return f"{self.sources[part]} row {row - self.starts[part]}"


def local_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not files or any(p.suffix not in LOCAL_BUILDERS for p in files):
        raise RecipeError(f"{path}: expected {', '.join(LOCAL_BUILDERS)} files")
    if len({LOCAL_BUILDERS[p.suffix] for p in files}) > 1:
        raise RecipeError(f"{path}: mixes file types; keep one of {', '.join(LOCAL_BUILDERS)} per dataset")
    return files


def load_rows(recipe: Recipe, split: str | None = None) -> Rows:
    """Rows of a local path or of the Hub dataset ``dataset_name`` (``dataset_config``, ``split``)."""
    from datasets import concatenate_datasets, load_dataset

    path = Path(recipe.dataset_name)
    if path.exists():
        files = local_files(path)
        parts = [load_dataset(LOCAL_BUILDERS[f.suffix], data_files=str(f), split="train") for f in files]
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + len(part))
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        return Rows(dataset, [f.name for f in files], starts)
    split = split or recipe.dataset_train_split
    dataset = load_dataset(recipe.dataset_name, recipe.dataset_config, split=split, revision=recipe.dataset_revision)
    return Rows(dataset, [f"{recipe.dataset_name}[{split}]"], [0])


def dataset_version(recipe: Recipe) -> dict[str, str]:
    """What exactly was trained on, for the model card: file hashes, or the Hub id and revision."""
    import hashlib

    path = Path(recipe.dataset_name)
    if path.exists():
        digest = hashlib.sha256()
        for file in local_files(path):
            digest.update(file.read_bytes())
        return {"name": path.name, "version": f"local files, sha256 {digest.hexdigest()[:16]}"}
    config = f", config {recipe.dataset_config}" if recipe.dataset_config else ""
    return {"name": recipe.dataset_name, "version": f"revision {recipe.dataset_revision or 'main'}{config}"}
