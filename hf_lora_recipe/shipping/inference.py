"""Load an adapter (or merged model) for inference and generate through the saved chat template."""

from __future__ import annotations

import dataclasses
from typing import Any

from hf_lora_recipe.recipe.schema import Recipe, saved_recipe


def load_for_inference(adapter: str | None, model_path: str | None, load_in_4bit: bool) -> tuple[Any, Any]:
    """The model ready to generate, and its tokenizer (saved with the adapter or merged model).

    ``load_in_4bit`` loads the base quantized exactly as training did, from the adapter's ``recipe.yaml``
    (the seed's NF4 settings for an adapter that has none, or for a merged model).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_lora_recipe.model.loading import quantization_config
    from hf_lora_recipe.upstream.notices import quiet_libraries

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
    top_p: float = 1.0,
    stream: bool = True,
) -> str:
    """The reply to one user turn, streamed to stdout; stops at EOS."""
    import torch
    from transformers import TextStreamer

    from hf_lora_recipe.templates.llama2 import encode_prompt, special_ids

    ids = special_ids(tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    input_ids = torch.tensor([encode_prompt(tokenizer, messages, ids)], device=model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
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
