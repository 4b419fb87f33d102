"""Publishing a run's folder to the Hugging Face Hub: what ``hf-lora-recipe push`` and ``push_to_hub: true`` run.

What goes up is decided from the folder's names and file types, and nothing is read through a link:

* **published**: regular files named in :data:`PUBLISHED` - exactly what ``train`` and ``merge`` write (adapter
  or merged weights and configs, the tokenizer files ``save_pretrained`` writes, with the extra chat templates in
  ``additional_chat_templates/``, the model card, ``recipe.yaml``, ``training_results.json``, the loss plot) -
  plus top-level files matching an explicit ``--include PATTERN``;
* **never**: pickles (:data:`NEVER`, even when ``--include`` matches them), dot-files, any other sub-folder
  (``checkpoint-*/``, ``runs/``), and symbolic links - a link is skipped with a warning wherever it points;
* anything else present (a stray ``notes.json``, ``secrets.txt``) is left out and named in one line.

The upload list (names and sizes) is printed before the commit. The commit is one atomic ``create_commit``;
the token comes from ``HF_TOKEN`` or the saved login and is never printed or written; transient HTTP failures
are retried with backoff. Every failure a user can cause is a :class:`PushError` (one line, exit code 2):
a bad ``--path`` or ``--repo_id`` and a missing token before any request, then a refused token (401/403), an
unreachable endpoint (after the retries) or any other HTTP status, each naming the endpoint and what to do.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.recipe.schema import RecipeError


PUBLISHED = (
    # the adapter (PEFT save_pretrained)
    "adapter_model.safetensors",
    "adapter_config.json",
    # a merged model (transformers save_pretrained: one file, or shards and their index)
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    # the tokenizer: fast tokenizers write the first three; the rest are what other tokenizer classes save
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    # the model card and the run's record
    "README.md",
    "recipe.yaml",
    "training_results.json",
    "training_loss.png",
)
PUBLISHED_FOLDERS = {"additional_chat_templates": ("*.jinja",)}  # a tokenizer's named extra chat templates
NEVER = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "training_args*")
MERGE_MARKER = ".hf-lora-recipe-merge"  # written by merge into every merged model (see merge.py); never published
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class PushError(RecipeError):
    """A push that cannot start or cannot finish: one line for the user, exit code 2."""


@dataclass
class Selection:
    """A folder's entries sorted into what is published and what is not (names relative to the folder)."""

    files: list[Path] = field(default_factory=list)  # regular files to upload
    links: list[str] = field(default_factory=list)  # symbolic links: skipped, never read through
    left_out: list[str] = field(default_factory=list)  # everything else (folders end in "/")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_files(directory: Path, include: Sequence[str] = ()) -> Selection:
    """Sort ``directory``'s entries (see the module docstring); reads names and types only, follows no link."""
    selection = Selection()
    _select(directory, "", (*PUBLISHED, *include), selection)
    return selection


def _select(directory: Path, prefix: str, patterns: Sequence[str], selection: Selection) -> None:
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        name = prefix + entry.name
        if entry.is_symlink():
            selection.links.append(name)
        elif entry.is_dir(follow_symlinks=False):
            if not prefix and entry.name in PUBLISHED_FOLDERS:
                _select(Path(entry.path), f"{name}/", PUBLISHED_FOLDERS[entry.name], selection)
            else:
                selection.left_out.append(f"{name}/")
        elif name == MERGE_MARKER:
            continue
        elif (
            entry.is_file(follow_symlinks=False)
            and not entry.name.startswith(".")
            and not _matches(entry.name, NEVER)
            and _matches(entry.name, patterns)
        ):
            selection.files.append(Path(entry.path))
        else:
            selection.left_out.append(name)


def files_to_publish(directory: Path, include: Sequence[str] = ()) -> list[Path]:
    """The files :func:`push` uploads from ``directory``."""
    return select_files(directory, include).files


def check_repo_id(repo_id: str, flag: str = "--repo_id") -> None:
    """Refuse a repo id the Hub cannot hold, before any request."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PushError(
            f"{flag} {repo_id!r} is not a valid Hub repo id: use NAME or NAMESPACE/NAME with letters, digits, "
            "'-', '_' and '.' (no '--' or '..', not starting or ending with '-' or '.', at most 96 characters)"
        ) from None


def check_push_possible(repo_id: str | None, flag: str = "hub_model_id") -> str:
    """The token for a push to ``repo_id``, after the checks that need no request: a valid id, online, a token."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id or "", flag)
    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set: push needs the Hub; unset it (or set HF_HUB_OFFLINE=0) and run again")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def check_folder(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise PushError(
            f"--path {directory}: no such folder; give the training output_dir or the merged model's folder"
        )
    if not directory.is_dir():
        raise PushError(
            f"--path {directory} is a file, not a folder; give the training output_dir or the merged model's folder"
        )
    return directory


def _transient(error: Exception) -> bool:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        return status in RETRY_STATUS
    name = type(error).__name__
    return any(word in name for word in ("Connect", "Timeout", "RemoteProtocol", "ReadError", "NetworkError"))


def with_retries(action: Any, what: str, attempts: int = 5, backoff_s: float = 1.0) -> Any:
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - only transient HTTP failures are retried
            if attempt == attempts or not _transient(error):
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warn(f"{what} failed ({type(error).__name__}); retry {attempt}/{attempts - 1} in {delay:.0f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _report(directory: Path, selection: Selection, include: Sequence[str]) -> None:
    for name in selection.links:
        log.warn(
            f"skipped {directory / name}: a symbolic link (push never follows links; copy the file in "
            "if it belongs in the repo)"
        )
    for pattern in include:
        if any(fnmatch.fnmatchcase(f.name, pattern) for f in selection.files if f.parent == directory):
            continue
        refused = [name for name in (*selection.left_out, *selection.links) if fnmatch.fnmatchcase(name, pattern)]
        log.warn(
            f"--include {pattern} matched "
            + (
                f"only files push never publishes (pickles, dot-files, folders, links): {', '.join(refused)}"
                if refused
                else f"no file in {directory}"
            )
        )
    if selection.left_out:
        log.info(
            f"not published (not in the allow-list; --include PATTERN adds top-level files): "
            f"{', '.join(selection.left_out)}"
        )


def push(
    path: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    attempts: int = 5,
    backoff_s: float = 1.0,
    include: Sequence[str] = (),
    base_model_id: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``path``'s publishable files in one commit; returns the repo URL.
    ``base_model_id``: the base's Hub id, when it was a local folder (see :mod:`.local_paths`)."""
    directory = check_folder(path)
    check_repo_id(repo_id)  # before anything is read; the rest of check_push_possible once the folder is known good
    if base_model_id is not None:
        check_repo_id(base_model_id, "--base_model_id")
    for pattern in include:
        if "/" in pattern or os.sep in pattern:
            raise PushError(
                f"--include {pattern}: patterns match top-level file names only (sub-folders are never published)"
            )
    selection = select_files(directory, include)
    _report(directory, selection, include)
    if not any(f.name.endswith(".safetensors") for f in selection.files):
        raise PushError(
            f"--path {directory} holds no .safetensors weights (adapter_model.safetensors or "
            "model*.safetensors): give a training output_dir or a merged model's folder"
        )

    check_complete(directory, selection.files)

    from huggingface_hub import CommitOperationAdd, HfApi

    token = check_push_possible(repo_id)

    from hf_lora_recipe.shipping.local_paths import machine_folders

    # this machine's folders a published file must not name: the run's, and those its recipe and adapter name
    folders = machine_folders(directory, *_recipe_paths(directory), _adapter_base(directory / "adapter_config.json"))
    contents = _contents(directory, selection.files, repo_id, folders, base_model_id)
    check_nothing_local(directory, contents, folders)
    total = sum(len(c) if isinstance(c, bytes) else c.stat().st_size for c in contents.values())
    target = repo_id + (f" (branch {revision})" if revision else "")
    log.info(f"uploading {len(contents)} files ({_size(total)}) to {target} in one commit:")
    for name, content in contents.items():
        log.info(f"  {name}  {_size(len(content) if isinstance(content, bytes) else content.stat().st_size)}")
    operations = []
    for name, content in contents.items():
        try:  # hashes the file now: an unreadable one fails here, before any request
            operations.append(CommitOperationAdd(name, content if isinstance(content, bytes) else str(content)))
        except OSError as error:
            raise PushError(
                f"cannot read {directory / name} ({error.strerror or error}): fix its permissions or "
                "move it out of the folder"
            ) from None

    api = HfApi(token=token)
    kind = "adapter" if "adapter_config.json" in contents else "model"
    message = commit_message or f"Upload {kind} trained with hf-lora-recipe"
    step = "create_repo"
    try:
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), step, attempts, backoff_s)
        if revision and revision != "main":
            step = "create_branch"
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), step, attempts, backoff_s)
        step = "upload"
        with_retries(
            lambda: api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision),
            step,
            attempts,
            backoff_s,
        )
    except Exception as error:  # noqa: BLE001 - HTTP failures become one line; anything else stays a bug
        failure = _push_error(error, step, api.endpoint, repo_id, token, attempts)
        if failure is error:
            raise
        raise failure from error
    return f"{api.endpoint}/{repo_id}"


def _contents(
    directory: Path, files: list[Path], repo_id: str, folders: list[str], base_model_id: str | None = None
) -> dict[str, Path | bytes]:
    """name -> file, or the bytes of a published copy: the run's record without this machine's paths, and the
    card re-rendered from it (see :mod:`hf_lora_recipe.shipping.local_paths`). The run files are read from the
    selection only, so nothing is read through a link."""
    import yaml

    from hf_lora_recipe.shipping.local_paths import base_hub_id, without_local_paths
    from hf_lora_recipe.shipping.model_card import RESULTS_FILE, render_card

    contents: dict[str, Path | bytes] = {file.relative_to(directory).as_posix(): file for file in files}
    try:
        recipe = yaml.safe_load(contents["recipe.yaml"].read_text()) if "recipe.yaml" in contents else {}
        results = json.loads(contents[RESULTS_FILE].read_text()) if RESULTS_FILE in contents else {}
        if not isinstance(recipe, dict) or not isinstance(results, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise PushError(
            f"recipe.yaml / {RESULTS_FILE} in {directory} cannot be read ({type(error).__name__}): they are "
            "published rewritten without local paths, so fix or remove them"
        ) from None
    adapter_base = _adapter_base(contents.get("adapter_config.json"))
    # without recipe.yaml, the adapter's own record of its base is what a recipe would have said
    base_id = base_hub_id(recipe or {"model_name_or_path": adapter_base}, base_model_id)
    if base_id is not None:  # what users' PeftModel.from_pretrained will fetch: a valid repo id
        check_repo_id(base_id, "--base_model_id" if base_model_id else "the base's Hub id")
    named = recipe.get("model_name_or_path") if recipe else adapter_base
    if base_id is None and (recipe or adapter_base):
        log.warn(
            f"the base was the local folder {Path(str(named)).name} and its Hub id is unknown: users must load the "
            "base themselves (the card says so); --base_model_id names it"
        )
    if recipe:
        published = without_local_paths(recipe)
        published["model_name_or_path"] = base_id or published.get("model_name_or_path")
        contents["recipe.yaml"] = yaml.safe_dump(published, sort_keys=False, allow_unicode=True).encode()
    if results:
        contents[RESULTS_FILE] = (json.dumps(without_local_paths(results), indent=2) + "\n").encode()
    if "adapter_config.json" in contents:
        try:
            adapter = json.loads(contents["adapter_config.json"].read_text())
            adapter["base_model_name_or_path"] = base_id
        except (OSError, ValueError, TypeError) as error:
            raise PushError(f"{directory / 'adapter_config.json'} cannot be read ({type(error).__name__})") from None
        contents["adapter_config.json"] = (json.dumps(adapter, indent=2, sort_keys=True) + "\n").encode()
    if "README.md" in contents and recipe:
        kind = "adapter" if "adapter_config.json" in contents else "merged"
        card = render_card(
            published,
            without_local_paths(results),
            repo_id,  # the load snippet names the repo, not the folder it was trained into
            kind,
            _merge_base(contents["README.md"], folders),
            has_plot="training_loss.png" in contents,
            base_unknown=base_id is None,
        )
        contents["README.md"] = card.encode()
    return contents


def _adapter_base(config: Path | bytes | None) -> str | None:
    try:
        data = json.loads(config.read_text()) if isinstance(config, Path) else None
    except (OSError, ValueError):
        return None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    return base if isinstance(base, str) and base else None


def check_nothing_local(directory: Path, contents: dict[str, Path | bytes], folders: list[str]) -> None:
    """No published text names a folder of this machine: a last check over exactly what is uploaded."""
    from hf_lora_recipe.shipping.local_paths import TEXT_SUFFIXES, first_local_path

    for name, content in contents.items():
        if not name.endswith(TEXT_SUFFIXES):
            continue
        text = (
            content.decode("utf-8", "replace") if isinstance(content, bytes) else content.read_text(errors="replace")
        )
        found = first_local_path(text, folders)
        if found:
            raise PushError(
                f"{name} would publish the local path {found}: remove it from {directory / name}, or leave the "
                "file out of the folder"
            )


def _push_error(error: Exception, step: str, endpoint: str, repo_id: str, token: str, attempts: int) -> Exception:
    """The one line a user sees for a failed request; the token never appears in it."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    server = (getattr(error, "server_message", None) or "").strip().replace(token, "<token>")
    server = server.splitlines()[0] if server else ""
    detail = f": {server}" if server else ""
    if status in (401, 403):
        return PushError(
            f"the Hub at {endpoint} refused the token (HTTP {status} on {step}{detail}): check HF_TOKEN "
            f"or `hf auth login`, and that the token may write to {repo_id}"
        )
    if status is not None:
        if status in RETRY_STATUS or status >= 500:
            hint = (
                f"the Hub is failing; run the push again later (nothing was committed after {attempts} "
                "attempt(s); --max_retries raises them)"
            )
        elif status == 404:
            hint = "check --repo_id and --revision"
        else:
            hint = "check --repo_id, --revision and the files listed above"
        return PushError(
            f"the Hub at {endpoint} answered HTTP {status} to {step} of {repo_id} ({server or 'no message'}): {hint}"
        )
    if _transient(error) or type(error).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
        reason = str(error).replace(token, "<token>").splitlines()[0] if str(error) else type(error).__name__
        return PushError(
            f"cannot reach the Hub at {endpoint} ({reason}) after {attempts} attempt(s): check "
            "HF_ENDPOINT and the network, then run the push again"
        )
    return error


def _merge_base(card_path: Path, local_folders: list[str]) -> str | None:
    """The merged card's merge-base line, with this machine's paths shortened to their names."""
    from hf_lora_recipe.shipping.local_paths import names_only

    for line in card_path.read_text(errors="replace").splitlines():
        if line.startswith("- merge base: "):
            return names_only(line.removeprefix("- merge base: ").strip("*"), local_folders)
    return None


def _recipe_paths(directory: Path) -> list[Any]:
    """The local paths the run's recipe.yaml names (base, data, output_dir, template): folders not to publish."""
    import yaml

    from hf_lora_recipe.shipping.local_paths import local

    try:
        recipe = yaml.safe_load((directory / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    values = list(recipe.values()) if isinstance(recipe, dict) else []
    values += [source.get("name") for source in (recipe or {}).get("datasets") or [] if isinstance(source, dict)]
    return [path for path in map(local, values) if path is not None]


def incomplete(file: Path) -> str | None:
    """Why a file we would publish is cut short (a write that ran out of space), or None."""
    import struct

    from hf_lora_recipe.shipping.model_card import is_our_card

    try:
        if file.suffix == ".safetensors":
            with file.open("rb") as handle:
                head = handle.read(8)
                length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                header = json.loads(handle.read(length)) if 0 < length < 100 << 20 else None
            if not isinstance(header, dict):
                return "its safetensors header is cut short"
            end = max((entry["data_offsets"][1] for k, entry in header.items() if k != "__metadata__"), default=0)
            if file.stat().st_size < 8 + length + end:
                return f"it holds {file.stat().st_size} bytes of the {8 + length + end} its header names"
        elif file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif (
            file.name == "README.md" and is_our_card(file) and "## How to load" not in file.read_text(errors="replace")
        ):
            return "the model card ends before its last section"
    except (ValueError, KeyError, TypeError, IndexError) as error:
        return f"it does not parse ({type(error).__name__})"
    return None


def check_complete(directory: Path, files: list[Path]) -> None:
    """Nothing half-written is published: every safetensors file holds the bytes its header names, every JSON
    file parses, and a card of ours has its last section."""
    for file in files:
        problem = incomplete(file)
        if problem:
            raise PushError(
                f"{file.relative_to(directory)} is incomplete ({problem}): write it again (rerun the training or "
                "merge that made it) before pushing"
            )
