"""``hf-lora-recipe push``: publish an adapter (or a merged model) to the Hugging Face Hub.

    hf-lora-recipe push --path DIR --repo_id NAME [--private] [--revision BRANCH] [--commit_message M]

Uploads, in one commit, what a user needs - safetensors, JSON configs, tokenizer files, chat template, model
card, recipe.yaml, training results and the loss plot - never checkpoints, optimizer states or pickles. The
token comes from ``HF_TOKEN`` or the saved login and is never printed, logged or written; ``HF_ENDPOINT`` is
respected. Transient HTTP failures are retried; the commit is atomic, so a failed push changes nothing on the
Hub or on disk, and running it again completes it.
"""

from __future__ import annotations

from . import log
from .arguments import CommandParser, command
from .config import RecipeError
from .publish import push

PARSER = CommandParser("push", __doc__)
PARSER.add_argument("--path", required=True, help="adapter or merged-model directory")
PARSER.add_argument("--repo_id", required=True, help="e.g. your-name/llama3-8b-alpaca-qlora")
PARSER.add_flag("--private", help="create the repo private")
PARSER.add_argument("--revision", help="branch to push to (created if missing); default main")
PARSER.add_argument("--commit_message")
PARSER.add_argument("--max_retries", type=int, default=4,
                    help="retries of a transient HTTP failure, backoff 1, 2, 4, 8 s (default: 4)")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    if args.max_retries < 0:
        raise RecipeError(f"--max_retries must be >= 0; got {args.max_retries}")
    url = push(args.path, args.repo_id, args.private, args.revision, args.commit_message, attempts=args.max_retries + 1)
    log.info(f"pushed {args.path} to {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0
