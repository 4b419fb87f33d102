"""Where rows come from: local files (one, or a folder of them split into train/validation/test) or a Hub
dataset, each row named as the user sees it.

Local JSON, JSON Lines and CSV are read here with the standard library, not by ``datasets``' builders, so no
column is ever re-typed: a column whose values are all strings (or null) is a string column; a column that
mixes types (one ``"output": 3`` among strings) keeps every value exactly as written (``datasets``' ``Json``
type), so the row formatter reports that very row. Rows are named the way an editor shows them: ``f.jsonl
line 7`` (1-based, blank lines counted), ``f.json element 6 (0-based)``, ``f.csv line 8`` (header = line 1),
``f.parquet row 6``. A split's table is cached as an Arrow file keyed by the files' paths, sizes and mtimes,
so later runs memory-map it and ``datasets`` can cache the maps built on it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_lora_recipe.files import write_atomically, write_text_atomically
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PATH_LIKE_SUFFIXES = {*LOCAL_BUILDERS, ".txt", ".tsv", ".gz", ".arrow", ".zip"}
# as datasets names splits from folder and file names on the Hub; a keyword counts between non-word characters
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SPLIT_PATTERNS = {
    split: re.compile(rf"(?:^|[-._ 0-9])(?:{'|'.join(words)})(?:[-._ 0-9]|$)", re.IGNORECASE)
    for split, words in SPLIT_KEYWORDS.items()
}
# the cache key changes with this file, so a fix to the reader never reuses a table it built before
_READER_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass
class Rows:
    """A ``datasets.Dataset`` of raw rows and where each row came from, for error messages."""

    dataset: Any
    sources: list[str]  # one name per part (file), in order
    starts: list[int]  # index of each part's first row in ``dataset``
    kinds: list[str] = field(default_factory=list)  # per part: "list", "lines", "csv" or "rows"
    paths: list[str | None] = field(default_factory=list)  # per part: the file, to find a row's line

    def origin(self, row: int) -> str:
        part = bisect.bisect_right(self.starts, row) - 1
        index = row - self.starts[part]
        kind = self.kinds[part] if self.kinds else "rows"
        path = Path(self.paths[part]) if self.paths and self.paths[part] else None
        if kind == "list":
            return f"{self.sources[part]} element {index} (0-based)"
        if kind in ("lines", "csv") and path is not None:
            try:
                line = _jsonl_line(path, index) if kind == "lines" else _csv_line(path, index)
                return f"{self.sources[part]} line {line}"
            except (OSError, UnicodeDecodeError, ValueError, IndexError):  # the file changed since: say the row
                pass
        return f"{self.sources[part]} row {index}"


# ---------------------------------------------------------------------------------------------- splits


def _split_named(name: str) -> str | None:
    found = [split for split, pattern in _SPLIT_PATTERNS.items() if pattern.search(name)]
    return found[0] if len(found) == 1 else ("?" + "+".join(found) if found else None)


def _split_of(relative: Path) -> str | None:
    """The split a file's folder names (the top-most that names one), else its file name, else None."""
    for part in relative.parts[:-1]:
        split = _split_named(part)
        if split:
            return split
    return _split_named(relative.stem)


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "__")) for part in relative.parts)


def _data_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    data = [p for p in files if p.suffix.lower() in LOCAL_BUILDERS]
    if not data:
        others = ", ".join(str(p.relative_to(folder)) for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise RecipeError(
            f"{folder}: no data files in this folder or its sub-folders (looked for {', '.join(LOCAL_BUILDERS)}"
            f"{'; found ' + others if others else '; it is empty'}); point dataset_name at a data file or a folder of them"
        )
    return data


def local_splits(path: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of a local file (the ``train`` split) or folder (split by folder or file names)."""
    if path.is_file():
        if path.suffix.lower() not in LOCAL_BUILDERS:
            raise RecipeError(f"{path}: not a data file type this recipe reads; use {', '.join(LOCAL_BUILDERS)}")
        return {"train": [path]}
    if not path.is_dir():
        raise RecipeError(f"{path}: not a file or folder")
    files = _data_files(path)
    named = {file: _split_of(file.relative_to(path)) for file in files}
    for file, split in named.items():
        if split and split.startswith("?"):
            raise RecipeError(
                f"{path}: {file.relative_to(path)} names more than one split ({split[1:].replace('+', ', ')}); "
                "rename it or move it into a train/, validation/ or test/ folder"
            )
    if not any(named.values()):
        return {"train": files}
    splits: dict[str, list[Path]] = {}
    for file, split in named.items():
        if split is None:
            found = ", ".join(sorted({s for s in named.values() if s}))
            raise RecipeError(
                f"{path}: {file.relative_to(path)} belongs to no split while other files are split by name "
                f"({found}); move it into a train/, validation/ or test/ folder (or name it *_train, *_test, ...)"
            )
        splits.setdefault(split, []).append(file)
    return splits


def local_files(path: Path) -> list[Path]:
    """Every data file of a local dataset, all splits, sorted."""
    return sorted(file for files in local_splits(path).values() for file in files)


def _canonical_split(name: str) -> str:
    for split, words in SPLIT_KEYWORDS.items():
        if name.lower() in words:
            return split
    return name


def _pick_split(splits: dict[str, list[Path]], requested: str, key: str, path: Path) -> str:
    for name in (requested, _canonical_split(requested)):
        if name in splits:
            return name
    if len(splits) == 1 and path.is_file():
        how = "a single file is the train split only"
    elif len(splits) == 1 and "train" in splits:
        how = "no sub-folder or file name names a split, so every file is in train"
    else:
        how = "from train/, validation/, test/ sub-folders or *train* / *valid* / *test* file names"
    raise RecipeError(f"{key}: {requested!r} is not a split of {path}; it has {', '.join(sorted(splits))} ({how})")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or "\\" in name
        or name.endswith("/")
        or name.count("/") > 1
        or Path(name).suffix.lower() in PATH_LIKE_SUFFIXES
    )


def local_path(recipe: Recipe) -> Path | None:
    """The local file or folder ``dataset_name`` names (``~`` expanded), None for a Hub id; a missing path is an error."""
    path = Path(recipe.dataset_name).expanduser()
    if path.exists():
        return path
    if _looks_like_path(recipe.dataset_name):
        parent = path.parent if str(path.parent) else Path(".")
        hint = "" if parent.is_dir() else f"; the folder {parent} does not exist either"
        raise RecipeError(
            f"dataset_name {recipe.dataset_name}: no such file or folder ({path.absolute()}{hint}); check the path "
            "(a Hub dataset id has the form owner/name)"
        )
    return None


# ---------------------------------------------------------------------------------------------- reading


def _read_text(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{name}: cannot read it ({error.strerror or error}); check its permissions") from None
    if not data.strip():
        raise RecipeError(f"{name} is empty: it holds no rows")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise RecipeError(
            f"{name}: not UTF-8 text{utf16}: byte 0x{data[error.start]:02x} at byte offset {error.start} (line {line}); "
            "re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


_JSON_TYPES = {
    dict: "object",
    list: "list",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _bad_json(
    name: str, error: json.JSONDecodeError, line: int | None = None, column: int | None = None
) -> RecipeError:
    line, column = line or error.lineno, column or error.colno
    return RecipeError(f"{name} line {line} column {column}: not valid JSON ({error.msg}); fix the file there")


def _json_lines(text: str, name: str) -> tuple[list[dict], list[int]]:
    """Rows of JSON Lines text and each row's 1-based line number (blank lines are skipped, but counted)."""
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            row = json.loads(stripped)
        except json.JSONDecodeError as error:
            indent = len(line) - len(line.lstrip())
            raise _bad_json(name, error, number, indent + error.colno) from None
        if type(row) is not dict:
            raise RecipeError(
                f"{name} line {number}: a JSON {_json_type(row)}, not an object; JSON Lines hold one row object per line"
            )
        rows.append(row)
        lines.append(number)
    return rows, lines


def _jsonl_line(path: Path, index: int) -> int:
    """The line of the ``index``-th row of a JSON Lines file."""
    seen = -1
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        if line.strip():
            seen += 1
            if seen == index:
                return number
    raise IndexError(index)


def read_json(path: Path, name: str) -> tuple[list[dict], str]:
    """(rows, "list" or "lines"): a ``.json`` holds a list of row objects, or JSON Lines as ``datasets`` allows."""
    text = _read_text(path, name)
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data" or not text.lstrip().startswith("{"):
                raise _bad_json(name, error) from None
            value = None  # more than one object: JSON Lines, as datasets reads them
        else:
            if isinstance(value, list):
                if not value:
                    raise RecipeError(f"{name} is an empty JSON list: it holds no rows")
                for index, row in enumerate(value):
                    if type(row) is not dict:
                        raise RecipeError(
                            f"{name} element {index} (0-based): a JSON {_json_type(row)}, not an object; "
                            "the list must hold one object per row"
                        )
                return value, "list"
            if not isinstance(value, dict) or "\n" in text.strip():
                keys = f" (keys {', '.join(list(value)[:5])})" if isinstance(value, dict) else ""
                raise RecipeError(
                    f"{name} holds a JSON {_json_type(value)}{keys}, not a list of rows; write the rows as a list "
                    "[{...}, {...}] or as JSON Lines (one object per line)"
                )
    try:
        rows, _ = _json_lines(text, name)
    except RecipeError as error:
        if text.lstrip().startswith("[") and path.suffix.lower() == ".jsonl":
            raise RecipeError(f"{error}; this looks like a JSON list: name the file .json") from None
        raise
    if not rows:
        raise RecipeError(f"{name} is empty: it holds no rows")
    return rows, "lines"


def _csv_records(text: str):
    """(first line, fields) per non-blank CSV record."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0
    for fields in reader:
        start, end = end + 1, reader.line_num
        if fields:
            yield start, fields


def _csv_line(path: Path, index: int) -> int:
    records = _csv_records(path.read_text(encoding="utf-8-sig"))
    next(records)  # the header
    for seen, (line, _) in enumerate(records):
        if seen == index:
            return line
    raise IndexError(index)


def read_csv(path: Path, name: str) -> list[dict]:
    """Rows of a CSV file with a header line; every value a string, an empty cell null (as pandas reads it)."""
    import csv

    records = _csv_records(_read_text(path, name))
    try:
        _, header = next(records)
        duplicates = sorted({column for column in header if header.count(column) > 1})
        if duplicates:
            raise RecipeError(f"{name} line 1: column {duplicates[0]!r} appears twice in the header; rename one")
        rows = []
        for line, fields in records:
            if len(fields) > len(header):
                raise RecipeError(
                    f"{name} line {line}: {len(fields)} values but the header names {len(header)} columns; "
                    "quote values that contain commas"
                )
            rows.append({column: (value if value != "" else None) for column, value in zip(header, fields)})
    except csv.Error as error:
        raise RecipeError(f"{name}: not valid CSV ({error}); fix the file") from None
    if not rows:
        raise RecipeError(f"{name} has a header but no rows")
    return rows


def _column(values: list) -> Any:
    """An Arrow column holding exactly what the JSON held: strings as strings; mixed types kept as written."""
    import pyarrow as pa

    kinds = set(map(type, values))
    kinds.discard(type(None))
    if kinds <= {str}:
        return pa.array(values, pa.string())
    if str not in kinds and (len(kinds) == 1 or kinds == {int, float}):
        try:
            return pa.array(values)  # one JSON type: Arrow infers it (structs unite their keys)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # nested values whose types differ
            pass
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.json_())


def _table(rows: list[dict]) -> Any:
    import pyarrow as pa

    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


def _read_parquet(files: list[Path], names: list[str]) -> tuple[Any, list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for file, name in zip(files, names):
        try:
            tables.append(pq.read_table(file))
        except (OSError, pa.ArrowException) as error:
            raise RecipeError(f"{name}: not a readable parquet file ({error}); re-export it") from None
        if tables[-1].num_rows == 0:
            raise RecipeError(f"{name} is empty: it holds no rows")
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as error:
        raise RecipeError(
            f"{names[0]} and the other parquet files have different columns or types ({error})"
        ) from None
    return table, [t.num_rows for t in tables]


def _read_split(files: list[Path], names: list[str]) -> tuple[Any, dict]:
    """(Arrow table of the split's files, {"kinds", "starts"})."""
    builders = {LOCAL_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise RecipeError(f"{names[0]}: a split mixes file types; keep one of json/jsonl, csv or parquet per split")
    if builders == {"parquet"}:
        table, sizes = _read_parquet(files, names)
        kinds = ["rows"] * len(files)
    else:
        rows: list[dict] = []
        sizes, kinds = [], []
        for file, name in zip(files, names):
            if file.suffix.lower() == ".csv":
                part, kind = read_csv(file, name), "csv"
            else:
                part, kind = read_json(file, name)
            rows.extend(part)
            sizes.append(len(part))
            kinds.append(kind)
        table = _table(rows)
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + size)
    return table, {"kinds": kinds, "starts": starts}


def _cache_key(files: list[Path]) -> str:
    state = [_READER_VERSION]
    for file in files:
        stat = file.stat()
        state.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]


def _load_split(files: list[Path], names: list[str]) -> tuple[Any, dict]:
    """(Dataset, meta) for a split: the cached Arrow file when the files are unchanged, else read and cache it."""
    import datasets
    import pyarrow as pa

    from hf_lora_recipe.upstream.datasets import in_memory_dataset, memory_mapped_dataset

    key = _cache_key(files)
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "hf_lora_recipe_local"
    arrow_file, meta_file = folder / f"{key}.arrow", folder / f"{key}.json"
    if arrow_file.exists() and meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            return memory_mapped_dataset(str(arrow_file), key), meta
        except (OSError, ValueError, pa.ArrowException):
            pass  # a damaged cache entry: read the files again
    table, meta = _read_split(files, names)
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def write_table(partial: Path) -> None:
            with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)

        write_atomically(arrow_file, write_table, partial=folder / f"{key}.{os.getpid()}.incomplete")
        write_text_atomically(meta_file, json.dumps(meta), partial=folder / f"{key}.{os.getpid()}.meta.incomplete")
        return memory_mapped_dataset(str(arrow_file), key), meta
    except OSError:  # a read-only or full cache: work in memory (no map cache)
        return in_memory_dataset(table, key), meta


def _display_name(path: Path, file: Path) -> str:
    return file.name if path.is_file() else (Path(path.resolve().name) / file.relative_to(path)).as_posix()


def split_files(recipe: Recipe, split: str | None = None) -> list[Path] | None:
    """The files of a local dataset's ``split`` (default: the train split, and then ``dataset_test_split`` must
    exist too), or None for a Hub dataset. Reads no data: a cheap pre-flight check of ``dataset_name``."""
    path = local_path(recipe)
    if path is None:
        return None
    splits = local_splits(path)
    if split is None:
        chosen = _pick_split(splits, recipe.dataset_train_split, "dataset_train_split", path)
        if recipe.dataset_test_split:
            _pick_split(splits, recipe.dataset_test_split, "dataset_test_split", path)
    else:
        chosen = _pick_split(splits, split, "dataset_test_split", path)
    return splits[chosen]


def load_rows(recipe: Recipe, split: str | None = None) -> Rows:
    """Rows of a local path or of the Hub dataset ``dataset_name`` (``dataset_config``, ``split``)."""
    files = split_files(recipe, split)
    if files is None:
        return _hub_rows(recipe, split or recipe.dataset_train_split)
    path = Path(recipe.dataset_name).expanduser()
    names = [_display_name(path, file) for file in files]
    dataset, meta = _load_split(files, names)
    return Rows(dataset, names, meta["starts"], meta["kinds"], [str(file) for file in files])


def _hub_rows(recipe: Recipe, split: str) -> Rows:
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    name = recipe.dataset_name
    try:
        dataset = load_dataset(name, recipe.dataset_config, split=split, revision=recipe.dataset_revision)
    except DatasetNotFoundError as error:
        raise RecipeError(
            f"dataset_name {name}: not a local file or folder, and not found on the Hub ({error})"
        ) from None
    except (ConnectionError, FileNotFoundError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise RecipeError(
            f"dataset_name {name}: not a local file or folder, and the Hub dataset could not be loaded{offline}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    except ValueError as error:
        from hf_lora_recipe.upstream.datasets import is_unknown_split_error

        if not is_unknown_split_error(error):
            raise
        raise RecipeError(f"dataset_name {name}: {str(error).splitlines()[0]}") from None
    return Rows(dataset, [f"{name}[{split}]"], [0], ["rows"], [None])


def dataset_version(recipe: Recipe) -> dict[str, str]:
    """What exactly was trained on, for the model card: file hashes, or the Hub id and revision (a mixture's:
    :func:`hf_lora_recipe.data.mixture.dataset_versions`)."""
    path = Path(recipe.dataset_name).expanduser()
    if path.exists():
        digest = hashlib.sha256()
        for file in local_files(path):
            digest.update(file.read_bytes())
        return {"name": path.name, "version": f"local files, sha256 {digest.hexdigest()[:16]}"}
    config = f", config {recipe.dataset_config}" if recipe.dataset_config else ""
    return {"name": recipe.dataset_name, "version": f"revision {recipe.dataset_revision or 'main'}{config}"}
