"""``hf-lora-recipe push``: publish an adapter (or a merged model) to the Hugging Face Hub.

    hf-lora-recipe push --path DIR --repo_id NAME [--private] [--revision BRANCH] [--commit_message M]
                        [--include PATTERN ...] [--max_retries N]

Uploads, in one commit, only the files our commands write - adapter or merged weights (safetensors) and their
configs, tokenizer files and chat templates (with a tokenizer's additional_chat_templates/*.jinja), model card,
recipe.yaml, training_results.json and the loss plot - plus top-level files matching --include (repeatable,
shell patterns). Never uploaded: checkpoint-*/ and any other sub-folder, pickles (*.bin *.pt *.pth *.pkl
*.pickle *.ckpt, even if --include matches them), dot-files, and symbolic links - a link is skipped with a
warning and never read through, wherever it points. Other files present are named in one line and left out;
the upload list (names and sizes) is printed before the commit.

The token comes from ``HF_TOKEN`` or the saved login and is never printed, logged or written; ``HF_ENDPOINT``
is respected. --path, --repo_id and the token are checked before any request. Transient HTTP failures are
retried; a refused token, an unreachable endpoint or another HTTP error ends in one line saying what to do.
The commit is atomic, so a failed push changes nothing on the Hub or on disk, and running it again completes it.
"""

from __future__ import annotations

from hf_lora_recipe import log
from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.recipe.schema import NON_NEGATIVE
from hf_lora_recipe.shipping.hub_upload import push


PARSER = CommandParser("push", __doc__)
PARSER.add_argument("--path", required=True, help="adapter or merged-model directory")
PARSER.add_argument("--repo_id", required=True, help="e.g. your-name/llama3-8b-alpaca-qlora")
PARSER.add_flag("--private", help="create the repo private")
PARSER.add_argument("--revision", help="branch to push to (created if missing); default main")
PARSER.add_argument("--commit_message")
PARSER.add_argument(
    "--include",
    action="append",
    default=[],
    metavar="PATTERN",
    help="also publish top-level files matching PATTERN, e.g. 'eval_*.json' (repeatable; never "
    "pickles, dot-files, folders or links)",
)
PARSER.add_argument(
    "--base_model_id",
    help="the base's Hub id when training used a local folder (default: the recipe's base_model_id, or the id its "
    "config records); the published adapter_config.json and card name it",
)
PARSER.add_number("--max_retries", int, NON_NEGATIVE, 4, "retries of a transient HTTP failure, backoff 1, 2, 4, 8 s")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    url = push(
        args.path,
        args.repo_id,
        args.private,
        args.revision,
        args.commit_message,
        attempts=args.max_retries + 1,
        include=args.include,
        base_model_id=args.base_model_id,
    )
    log.info(f"pushed {args.path} to {url}" + (f" (branch {args.revision})" if args.revision else ""))
    return 0
