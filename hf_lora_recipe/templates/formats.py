"""Each family's own instruct format as a chat template of ours (``chat_template: chatml``, ``llama3``, ``gemma``,
``mistral``, ``phi3``), for a base whose tokenizer carries the format's special tokens but no template (a base
model of that family), or to train exactly the layout its instruct model is served with. Each renders what the
family documents (checked literally in tests/test_chat_templates.py), and is trained through the same masking as
a ``.jinja`` file: prompt masked, response and the end-of-turn token supervised.

Families without a system role (Gemma, Mistral) fold a system message into the first user turn, as Gemma 3's
and Mistral's own templates do, rather than refusing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_lora_recipe.recipe.schema import FAMILY_FORMATS


@dataclass(frozen=True)
class Format:
    jinja: str
    markers: tuple[str, ...]  # the special tokens the tokenizer must hold: in text they would be split into pieces
    source: str  # where the rendering is documented


_FOLD_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim + '\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
)

FORMATS = {
    "chatml": Format(
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim"
        " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        ("<|im_start|>", "<|im_end|>"),
        "Qwen2.5/Qwen3 and SmolLM2 model cards (ChatML)",
    ),
    "llama3": Format(
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Meta's Llama 3 model card, prompt format",
    ),
    "gemma": Format(
        "{{ bos_token }}" + _FOLD_SYSTEM + "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] | trim"
        " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        ("<start_of_turn>", "<end_of_turn>"),
        "Google's Gemma formatting guide (the system text opens the first user turn, as in Gemma 3's template)",
    ),
    "mistral": Format(
        "{{ bos_token }}" + _FOLD_SYSTEM + "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ message['content'] | trim + eos_token }}{% endif %}{% endfor %}",
        (),  # text in Mistral 7B v0.1's tokenizer, control tokens in v0.3's: either works
        "Mistral's instruct format: <s>[INST] Instruction [/INST] Answer</s>[INST] Follow-up [/INST]",
    ),
    "phi3": Format(
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "Microsoft's Phi-3.5/Phi-4-mini model cards, chat format",
    ),
}


if set(FORMATS) != set(FAMILY_FORMATS):  # the recipe's choices and the templates behind them
    raise RuntimeError(f"templates/formats.py defines {sorted(FORMATS)}, the recipe offers {sorted(FAMILY_FORMATS)}")


def missing_markers(tokenizer: object, name: str) -> list[str]:
    """The format's markers the tokenizer does not hold as special tokens."""
    special = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return [marker for marker in FORMATS[name].markers if marker not in special]
