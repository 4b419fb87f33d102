"""``hf-lora-recipe generate``: chat with an adapter or a merged model through the saved template.

    hf-lora-recipe generate (--adapter DIR_OR_REPO | --model MERGED_DIR_OR_REPO) --prompt TEXT
                            [--system TEXT] [--max_new_tokens N] [--temperature T] [--load_in_4bit]

The prompt is rendered with the same token layout as training (the tokenizer's saved chat template gives
the same ids), tokens stream to stdout as they are generated, and generation stops at EOS.
"""

from __future__ import annotations

from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.recipe.schema import RecipeError
from hf_lora_recipe.shipping.inference import generate, load_for_inference


PARSER = CommandParser("generate", __doc__)
_SOURCE = PARSER.add_mutually_exclusive_group(required=True)
_SOURCE.add_argument("--adapter", help="adapter directory or Hub repo (its base is loaded from adapter_config.json)")
_SOURCE.add_argument("--model", help="merged model directory or Hub repo")
PARSER.add_argument("--prompt", required=True, help="the user turn")
PARSER.add_argument("--system", help="optional system prompt")
PARSER.add_argument("--max_new_tokens", type=int, default=256, help="(default: 256)")
PARSER.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
PARSER.add_flag("--load_in_4bit", help="load the base quantized as training did (from the adapter's recipe.yaml)")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    if args.max_new_tokens < 1:
        raise RecipeError(f"--max_new_tokens must be >= 1; got {args.max_new_tokens}")
    if args.temperature < 0:
        raise RecipeError(f"--temperature must be >= 0; got {args.temperature}")
    model, tokenizer = load_for_inference(args.adapter, args.model, args.load_in_4bit)
    generate(model, tokenizer, args.prompt, args.system, args.max_new_tokens, args.temperature)
    return 0
