"""``hf-lora-recipe generate``: chat with an adapter or a merged model through the saved template.

    hf-lora-recipe generate (--adapter DIR_OR_REPO | --model MERGED_DIR_OR_REPO) --prompt TEXT
                            [--system TEXT] [--max_new_tokens N] [--temperature T] [--load_in_4bit]

The prompt is rendered with the same token layout as training (the tokenizer's saved chat template gives
the same ids), tokens stream to stdout as they are generated, and generation stops at EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .arguments import CommandParser, command
from .config import Recipe, RecipeError, saved_recipe


def load_for_inference(adapter: str | None, model_path: str | None, load_in_4bit: bool) -> tuple[Any, Any]:
    """The model ready to generate, and its tokenizer (saved with the adapter or merged model).

    ``load_in_4bit`` loads the base quantized exactly as training did, from the adapter's ``recipe.yaml``
    (the seed's NF4 settings for an adapter that has none, or for a merged model).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling import quantization_config
    from .quiet import quiet_libraries

    quiet_libraries()
    source = adapter or model_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if load_in_4bit:
        trained = (saved_recipe(adapter) if adapter else None) or Recipe()
        kwargs["quantization_config"] = quantization_config(dataclasses.replace(trained, load_in_4bit=True))
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    if adapter:
        from peft import PeftConfig, PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            PeftConfig.from_pretrained(adapter).base_model_name_or_path, **kwargs
        )
        model = PeftModel.from_pretrained(base, adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return model.eval(), tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool = True,
) -> str:
    """The reply to one user turn, streamed to stdout; stops at EOS."""
    import torch
    from transformers import TextStreamer

    from .template import encode_prompt, special_ids

    ids = special_ids(tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    input_ids = torch.tensor([encode_prompt(tokenizer, messages, ids)], device=model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=ids.eos_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
            **sampling,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


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
