"""What a run was trained on, recorded in every checkpoint and compared before a resume loads anything.

The identity holds the resolved recipe, the base (its config.json and the layout of its safetensors: names,
sizes and headers, which name every tensor's dtype, shape and offsets; the values are not read), the data (the
sha256 of every local file, or the Hub id and revision) and the chat template (a ``.jinja`` file's sha256).

On resume each recipe key is judged by its ``resume`` policy in the schema (``REFUSE``, ``ALLOW``, ``DATA``), so a
new key is refused until someone decides otherwise. A changed base or template is refused; a data change is
refused unless ``allow_data_change``; what is allowed is logged and kept, with every earlier resume's, in the
checkpoints, ``training_results.json`` and the card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from hf_lora_recipe.files import file_sha256
from hf_lora_recipe.recipe.schema import ALLOW, DATA, FIELDS, REFUSE, Recipe, RecipeError


IDENTITY = "identity"  # the key of the checkpoint marker (hf_lora_recipe.json) that holds it
RESUMES = "resumes"  # the earlier resumes' changes, carried from checkpoint to checkpoint
# how this invocation starts, not what it trains: never a difference
INVOCATION_KEYS = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "allow_data_change")


def _sha256(path: Path) -> str:
    return file_sha256(path)[:16]


def _safetensors_layout(path: Path) -> bytes:
    """The file's size and its header (8-byte length, then JSON naming each tensor's dtype, shape and offsets)."""
    with path.open("rb") as file:
        head = file.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        return str(path.stat().st_size).encode() + head + file.read(min(length, 100 << 20))


def base_folder(recipe: Recipe) -> Path | None:
    """The folder holding the base's config.json: the local folder, or the cached Hub snapshot (None: not cached)."""
    path = Path(recipe.model_name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(recipe.model_name_or_path, "config.json", revision=recipe.model_revision)
    except ValueError:  # not a repo id: the recipe checks have said so already
        return None
    return Path(found).parent if isinstance(found, str) else None


def base_identity(recipe: Recipe) -> dict[str, str]:
    folder = base_folder(recipe)
    if folder is None or not (folder / "config.json").is_file():
        return {"name": recipe.model_name_or_path, "revision": recipe.model_revision}
    layout = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        layout.update(file.name.encode() + _safetensors_layout(file))
    return {"config_sha256": _sha256(folder / "config.json"), "weights_layout_sha256": layout.hexdigest()[:16]}


def template_identity(recipe: Recipe) -> str:
    path = Path(recipe.chat_template).expanduser()
    return (
        f"{path.name}, sha256 {_sha256(path)}" if path.suffix == ".jinja" and path.is_file() else recipe.chat_template
    )


def run_identity(recipe: Recipe) -> dict[str, Any]:
    from hf_lora_recipe.data.mixture import dataset_versions

    return {
        "recipe": json.loads(json.dumps(dataclasses.asdict(recipe), default=str)),
        "base": base_identity(recipe),
        "data": dataset_versions(recipe),
        "template": template_identity(recipe),
    }


def _shown(value: Any) -> str:
    """A value as the change list shows it; a local path by its name only (the list goes into the card)."""
    if isinstance(value, list):
        return ",".join(_shown(v) for v in value) or "[]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return Path(value).expanduser().name
    return str(value)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[str]]:
    """``old -> new`` per changed key, by policy: ``refuse``, ``allow`` or ``data``. Keys the saved identity
    does not hold (recorded by an older version) are not compared."""
    found: dict[str, list[str]] = {REFUSE: [], ALLOW: [], DATA: []}
    old_recipe, new_recipe = saved.get("recipe", {}), current["recipe"]
    for key, spec in FIELDS.items():
        if key in old_recipe and old_recipe[key] != new_recipe.get(key) and key not in INVOCATION_KEYS:
            found[spec.metadata["resume"]].append(f"{key} {_shown(old_recipe[key])} -> {_shown(new_recipe.get(key))}")
    for part, policy in (("base", REFUSE), ("template", REFUSE), ("data", DATA)):
        if part in saved and saved[part] != current[part]:
            old, new = saved[part], current[part]
            if isinstance(old, dict) and isinstance(new, dict):
                changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                found[policy] += [f"{part} {k} {old.get(k)} -> {new.get(k)}" for k in changed]
            else:
                found[policy].append(f"{part} {old} -> {new}")
    return found


def check_resume(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any], recipe: Recipe) -> list[str]:
    """Refuse a resume that would mix two runs; the allowed changes it makes (data ones when allowed)."""
    found = differences(saved, current)
    if found[REFUSE]:
        raise RecipeError(
            f"{checkpoint} was trained with another recipe ({'; '.join(found[REFUSE])}): resume with the recipe it "
            "was trained with, or pass --overwrite_output_dir true (or another output_dir) to start again"
        )
    if found[DATA] and not recipe.allow_data_change:
        raise RecipeError(
            f"{checkpoint} was trained on other data ({'; '.join(found[DATA])}): pass --allow_data_change true to "
            "go on training it on this data (the card records both), or --overwrite_output_dir true to start again"
        )
    return found[DATA] + found[ALLOW]


def resume_record(checkpoint: str, step: int, changes: list[str], saved: dict[str, Any]) -> dict[str, Any]:
    """One resume's entry in ``resumes``: where it picked up and what it changed (the data it came from)."""
    record: dict[str, Any] = {"checkpoint": Path(checkpoint).name, "step": step, "changes": changes}
    if any(change.startswith("data ") or change.split(" ", 1)[0] in _data_keys() for change in changes):
        record["data_before"] = saved.get("data")
    return record


def _data_keys() -> set[str]:
    return {key for key, spec in FIELDS.items() if spec.metadata["resume"] == DATA}
