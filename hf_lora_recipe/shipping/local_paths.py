"""Nothing local goes to the Hub: the published copies of a run's files name no path of this machine.

``push`` uploads rewritten copies (the folder on disk is left as written):

* ``recipe.yaml`` and ``training_results.json``: every value that is a path on this machine by its name only;
  the base by its Hub id when one is known;
* ``adapter_config.json``: ``base_model_name_or_path`` is the base's Hub id, or null when none is known (users
  then pass their copy of the base to ``PeftModel.from_pretrained`` themselves, and the card says so);
* the card, rendered from those copies.

The base's Hub id is, in order: ``--base_model_id`` (or the recipe's ``base_model_id``), the recipe's
``model_name_or_path`` when it is not a folder here, or the ``_name_or_path`` the base folder's config.json
records when that is not a path. Then every published text file is searched for this machine's folders (the
run's, the base's, the data's, the working directory and the home directory); one found stops the push.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md", ".jinja", ".txt")


def local(value: Any) -> Path | None:
    """``value`` as a path on this machine (it exists, or it is absolute), else None."""
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
        return None
    path = Path(value).expanduser()
    try:
        return path if path.is_absolute() or path.exists() else None
    except OSError:
        return None


def without_local_paths(value: Any) -> Any:
    """``value`` with every string that is a path here replaced by its last component."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    path = local(value)
    return path.name if path is not None else value


def _looks_like_repo_id(value: Any) -> bool:
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or local(value) is not None:
        return False
    try:
        validate_repo_id(value)
    except ValueError:
        return False
    return True


def base_hub_id(recipe: dict[str, Any], base_model_id: str | None = None) -> str | None:
    """The Hub id of the run's base, when it can be known (see the module docstring)."""
    if base_model_id:
        return base_model_id
    if recipe.get("base_model_id"):
        return str(recipe["base_model_id"])
    base = recipe.get("model_name_or_path")
    folder = local(base)
    if folder is None:
        return base if _looks_like_repo_id(base) else None
    try:
        recorded = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if _looks_like_repo_id(recorded) else None


def machine_folders(*paths: Any) -> list[str]:
    """The folders of this machine a published file must not name: the given ones (that exist or are absolute),
    the working directory and the home directory (not ``/``)."""
    found = {str(Path.cwd()), str(Path.home())}
    for value in paths:
        path = local(value) if not isinstance(value, Path) else value
        if path is not None:
            path = path.expanduser()
            folder = path.parent if path.is_file() else path
            found.update({str(folder.resolve()), str(folder.absolute())})
    return sorted((folder for folder in found if folder not in ("/", "")), key=len, reverse=True)


def first_local_path(text: str, folders: list[str]) -> str | None:
    """A folder of ``folders`` named in ``text`` as a path (not inside a URL or a longer name), or None."""
    for folder in folders:
        if re.search(r"(?<![\w.\-/])" + re.escape(folder) + r"(?![\w.\-])", text):
            return folder
    return None


def names_only(text: str, folders: list[str]) -> str:
    """``text`` with each path under one of ``folders`` shortened to its last component."""
    for folder in folders:
        pattern = r"(?<![\w.\-/])" + re.escape(folder) + r"(?:/[^\s`'\"*)]*)?"
        text = re.sub(pattern, lambda match: Path(match.group(0).rstrip("/")).name or match.group(0), text)
    return text
