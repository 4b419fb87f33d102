"""``hf-lora-recipe generate``: chat with an adapter or a merged model through the saved template.

    hf-lora-recipe generate (--adapter DIR_OR_REPO | --model MERGED_DIR_OR_REPO) --prompt TEXT
                            [--system TEXT] [--max_new_tokens N] [--temperature T] [--top_p P]
                            [--load_in_4bit]

The prompt is rendered with the same token layout as training (the tokenizer's saved chat template gives
the same ids), tokens stream to stdout as they are generated, and generation stops at EOS.
"""

from __future__ import annotations

import sys

from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.recipe.schema import COUNT, NON_NEGATIVE, SHARE, RecipeError
from hf_lora_recipe.shipping.inference import generate, load_for_inference


PARSER = CommandParser("generate", __doc__)
_SOURCE = PARSER.add_mutually_exclusive_group(required=True)
_SOURCE.add_argument("--adapter", help="adapter directory or Hub repo (its base is loaded from adapter_config.json)")
_SOURCE.add_argument("--model", help="merged model directory or Hub repo")
PARSER.add_argument("--prompt", required=True, help="the user turn; - reads it from stdin")
PARSER.add_argument("--system", help="optional system prompt")
PARSER.add_number("--max_new_tokens", int, COUNT, 256, "reply length limit")
PARSER.add_number("--temperature", float, NON_NEGATIVE, 0.0, "sampling temperature; 0 = greedy")
PARSER.add_number(
    "--top_p",
    float,
    SHARE,
    1.0,
    "nucleus sampling (with a temperature > 0)",
)
PARSER.add_flag("--load_in_4bit", help="load the base quantized as training did (from the adapter's recipe.yaml)")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    if args.prompt == "-":
        args.prompt = sys.stdin.read().strip("\n")
        if not args.prompt.strip():
            raise RecipeError("--prompt -: stdin held no text; pipe the prompt in, or give it as --prompt TEXT")
    model, tokenizer = load_for_inference(args.adapter, args.model, args.load_in_4bit)
    generate(model, tokenizer, args.prompt, args.system, args.max_new_tokens, args.temperature, args.top_p)
    return 0
