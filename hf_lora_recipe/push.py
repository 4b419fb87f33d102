"""``hf-lora-recipe push``: publish an adapter (or a merged model) to the Hugging Face Hub.

    hf-lora-recipe push --path DIR --repo_id NAME [--private] [--revision BRANCH] [--commit_message M]

Uploads what a user needs - safetensors, JSON configs, tokenizer files, chat template, model card,
recipe.yaml, training results and the loss plot - in one commit, never checkpoints, optimizer states or
pickles. The token comes from ``HF_TOKEN`` or the saved login and is never printed, logged or written;
``HF_ENDPOINT`` is respected. Transient HTTP failures are retried; the commit is atomic, so a failed push
changes nothing on the Hub or on disk, and running it again completes it.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path
from typing import Any

PUBLISHED = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt", "vocab.txt", "README.md",
             "recipe.yaml", "training_loss.png")
NEVER = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "training_args*")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class PushError(RuntimeError):
    pass


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
            print(f"[hf-lora-recipe] {what} failed ({type(error).__name__}); retry {attempt}/{attempts - 1} in {delay:.0f}s",
                  file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-lora-recipe push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="adapter or merged-model directory")
    parser.add_argument("--repo_id", required=True, help="e.g. your-name/llama3-8b-alpaca-qlora")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to (created if missing); default main")
    parser.add_argument("--commit_message")
    parser.add_argument("--max_retries", type=int, default=4, help="retries of a transient HTTP failure (backoff 1, 2, 4, 8 s)")
    args = parser.parse_args(argv)
    try:
        url = push(args.path, args.repo_id, args.private, args.revision, args.commit_message, attempts=args.max_retries + 1)
    except PushError as error:
        print(f"hf-lora-recipe push: error: {error}", file=sys.stderr)
        return 2
    print(f"pushed {args.path} to {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0
