"""Publishing a run's folder to the Hugging Face Hub: what ``hf-lora-recipe push`` and ``push_to_hub: true`` run.

One atomic ``create_commit`` of the files a user needs (never checkpoints, optimizer states or pickles), with
the token from ``HF_TOKEN`` or the saved login (never printed or written) and retries of transient failures.
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Any

from . import log
from .config import RecipeError

PUBLISHED = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt", "README.md",
             "recipe.yaml", "training_loss.png")
NEVER = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "training_args*")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class PushError(RecipeError):
    """A push that cannot start or cannot finish: one line for the user, exit code 2."""


def files_to_publish(directory: Path) -> list[Path]:
    """Top-level files a user needs; sub-directories (checkpoint-*/, staging) are never published."""
    chosen = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if any(fnmatch.fnmatch(path.name, p) for p in NEVER):
            continue
        if any(fnmatch.fnmatch(path.name, p) for p in PUBLISHED):
            chosen.append(path)
    return chosen


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


def push(
    path: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
    commit_message: str | None = None, attempts: int = 5, backoff_s: float = 1.0,
) -> str:
    """Create ``repo_id`` if needed and upload ``path`` in one commit; returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from .card import read_run, render_card

    directory = Path(path)
    if not directory.is_dir():
        raise PushError(f"--path {directory} is not a directory")
    files = files_to_publish(directory)
    if not any(f.suffix == ".safetensors" for f in files):
        raise PushError(f"{directory} holds no .safetensors weights: nothing to publish")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create_repo", attempts, backoff_s)
    if revision and revision != "main":
        with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "create_branch", attempts, backoff_s)

    operations = []
    recipe, results = read_run(directory)
    for file in files:
        if file.name == "README.md" and recipe:
            # The card's load snippet names the repo, not the local path it was trained into.
            kind = "adapter" if (directory / "adapter_config.json").is_file() else "merged"
            card = render_card(recipe, results, repo_id, kind, _merge_base(file),
                               has_plot=(directory / "training_loss.png").is_file())
            operations.append(CommitOperationAdd("README.md", card.encode()))
        else:
            operations.append(CommitOperationAdd(file.name, str(file)))
    kind = "adapter" if (directory / "adapter_config.json").is_file() else "model"
    message = commit_message or f"Upload {kind} trained with hf-lora-recipe"
    with_retries(
        lambda: api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision),
        "upload", attempts, backoff_s,
    )
    return f"{api.endpoint}/{repo_id}"


def _merge_base(card_path: Path) -> str | None:
    for line in card_path.read_text().splitlines():
        if line.startswith("- merge base: "):
            return line.removeprefix("- merge base: ").strip("*")
    return None
