"""The seed's Llama-2 prompt format, as a tokenizer chat template and as the token layout we train on.

One conversation renders as ``<s>[INST] u1 [/INST] a1 </s><s>[INST] u2 [/INST] a2 </s>``. The saved chat
template and :func:`encode_conversations` produce the same tokens, so ``apply_chat_template`` at inference
reproduces the training prompt. Tokens are built chunk by chunk rather than from one rendered string
because:

* the control tokens (BOS/EOS) come from ids, and every text chunk is tokenized with
  ``split_special_tokens=True`` - a literal ``</s>`` typed in a dataset row is text, never an EOS;
* the prompt chunk ends at ``[/INST]`` and the response chunk starts with its space, so the first
  response token belongs wholly to the response and the mask can't be off by one at the boundary.
"""

from __future__ import annotations

from typing import Any

from hf_lora_recipe.templates.jinja import IGNORE_INDEX, SpecialIds, encode_templated, templated_ids


SYSTEM_OPEN, SYSTEM_CLOSE = "<<SYS>>\n", "\n<</SYS>>\n\n"


def chat_template(uses_bos: bool) -> str:
    """The Jinja chat template saved with the tokenizer (``{% generation %}`` marks what is trained)."""
    bos = "{{ bos_token }}" if uses_bos else ""
    return (
        "{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% set ns.system = '"
        + SYSTEM_OPEN.replace("\n", "\\n")
        + "' + message['content'] | trim + '"
        + SYSTEM_CLOSE.replace("\n", "\\n")
        + "' %}"
        "{% elif message['role'] == 'user' %}"
        + bos
        + "{{ '[INST] ' + ns.system + message['content'] | trim + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% elif message['role'] == 'assistant' %}"
        "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
        "{% endif %}"
        "{% endfor %}"
    )


def user_chunk(content: str, system: str = "") -> str:
    system_block = f"{SYSTEM_OPEN}{system.strip()}{SYSTEM_CLOSE}" if system else ""
    return f"[INST] {system_block}{content.strip()} [/INST]"


def assistant_chunk(content: str) -> str:
    return f" {content.strip()} "


def is_llama2_template(template: str | None) -> bool:
    return template in (chat_template(True), chat_template(False))


def special_ids(tokenizer: Any) -> SpecialIds:
    """The layout of the tokenizer's installed chat template: BOS (llama2 only), end-of-turn and control tokens."""
    if tokenizer.chat_template and not is_llama2_template(tokenizer.chat_template):
        return templated_ids(tokenizer)
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    bos_id = (
        tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        else None
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could never learn to stop")
    control = tuple(sorted({tokenizer.eos_token_id} | ({bos_id} if bos_id is not None else set())))
    return SpecialIds(bos_id=bos_id, eos_id=tokenizer.eos_token_id, control_ids=control)


def conversation_chunks(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """[(role, text chunk)] for user and assistant turns, the system prompt folded into the next user turn."""
    chunks: list[tuple[str, str]] = []
    system = ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system = content
        elif role == "user":
            chunks.append(("user", user_chunk(content, system)))
            system = ""
        elif role == "assistant":
            chunks.append(("assistant", assistant_chunk(content)))
        else:
            raise ValueError(f"unknown role {role!r}")
    return chunks


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of plain text, special-token strings included as text; fast tokenizers go straight to Rust."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True  # text is data: a typed "</s>" is never the control token
    try:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def decode_texts(tokenizer: Any, sequences: list[list[int]]) -> list[str]:
    """``batch_decode`` with special tokens shown, without transformers' per-token Python conversion."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return tokenizer.batch_decode(sequences, skip_special_tokens=False)
    return backend.decode_batch(sequences, skip_special_tokens=False)


def encode_conversations(
    tokenizer: Any, conversations: list[list[dict[str, str]]], ids: SpecialIds
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels for a batch of conversations; one tokenizer call for all chunks of the batch.

    For the ``llama2`` layout:
    Every user turn opens with BOS (where the tokenizer uses one) and is masked; every assistant turn is
    supervised together with its closing EOS - the EOS is what teaches the model to stop. Other templates go
    through :func:`encode_templated`, with the same guarantees.
    """
    if ids.layout == "template":
        return encode_templated(tokenizer, conversations, ids)
    per_conversation = [conversation_chunks(messages) for messages in conversations]
    texts = [text for chunks in per_conversation for _, text in chunks]
    encoded = encode_texts(tokenizer, texts) if texts else []
    position = 0
    all_input_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    for chunks in per_conversation:
        input_ids: list[int] = []
        labels: list[int] = []
        for role, _ in chunks:
            token_ids = encoded[position]
            position += 1
            if role == "user":
                prompt = ([ids.bos_id] if ids.bos_id is not None else []) + token_ids
                input_ids += prompt
                labels += [IGNORE_INDEX] * len(prompt)
            else:
                response = token_ids + [ids.eos_id]
                input_ids += response
                labels += response
        all_input_ids.append(input_ids)
        all_labels.append(labels)
    return all_input_ids, all_labels


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], ids: SpecialIds) -> list[int]:
    """The generation prompt: the conversation so far, ending where the assistant's reply begins (``[/INST]``,
    or the template's generation prompt such as ``<|im_start|>assistant\\n``)."""
    if ids.layout == "template":
        return encode_templated(tokenizer, [messages], ids, generation_prompt=True)[0][0]
    input_ids, _ = encode_conversations(tokenizer, [messages], ids)
    return input_ids[0]


def template_token_ids(tokenizer: Any) -> list[int]:
    """The special tokens the installed chat template writes (BOS, EOS, turn markers): the rows of the embedding
    the model conditions on or is trained to produce, whichever template is chosen."""
    return sorted(special_ids(tokenizer).control_ids)
