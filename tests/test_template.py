"""The seed's Llama-2 format: rendered text, token layout, masks, and the saved chat template."""

from __future__ import annotations

from transformers import AutoTokenizer

from hf_lora_recipe.data.row_formats import alpaca_conversation
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, encode_conversations, encode_prompt, special_ids
from hf_lora_recipe.templates.tokenizer import save_tokenizer


def alpaca_messages(instruction, input_text, output, row):
    messages, problem = alpaca_conversation(instruction, input_text, output)
    assert problem is None
    return messages


def _encode(tokenizer, messages):
    input_ids, labels = encode_conversations(tokenizer, [messages], special_ids(tokenizer))
    return input_ids[0], labels[0]


def test_alpaca_row_renders_as_the_seed_format(llama2_tokenizer):
    with_input = alpaca_messages("Sum the numbers.", "2 and 3", "5", row=0)
    without_input = alpaca_messages("Say hi.", "", "Hi!", row=1)
    missing_input = alpaca_messages("Say hi.", None, "Hi!", row=2)
    render = lambda m: llama2_tokenizer.apply_chat_template(m, tokenize=False)  # noqa: E731
    assert render(with_input) == "<s>[INST] Sum the numbers.\n2 and 3 [/INST] 5 </s>"
    assert render(without_input) == "<s>[INST] Say hi. [/INST] Hi! </s>"  # no stray newline
    assert render(missing_input) == render(without_input)


def test_prompt_masked_response_and_eos_supervised(tokenizer):
    messages = alpaca_messages("Name a hue.", "", "Blue is a colour.", row=0)
    input_ids, labels = _encode(tokenizer, messages)
    ids = special_ids(tokenizer)
    supervised = [t for t, y in zip(input_ids, labels) if y != IGNORE_INDEX]
    first = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    # everything before the response is masked; everything from its first token on is supervised
    assert all(y == IGNORE_INDEX for y in labels[:first]) and all(y != IGNORE_INDEX for y in labels[first:])
    assert supervised[-1] == ids.eos_id and input_ids[-1] == ids.eos_id
    assert tokenizer.decode(supervised[:-1]).strip() == "Blue is a colour."
    assert tokenizer.decode(input_ids[:first], skip_special_tokens=True).strip() == "[INST] Name a hue. [/INST]"
    # exactly one BOS where the tokenizer uses one, none otherwise
    bos_count = input_ids.count(tokenizer.bos_token_id) if ids.bos_id is not None else 0
    assert bos_count == (1 if ids.bos_id is not None else 0)
    if ids.bos_id is not None:
        assert input_ids[0] == ids.bos_id


def test_special_token_text_in_a_row_is_text(tokenizer):
    eos_text = tokenizer.eos_token
    messages = alpaca_messages(f"Repeat {eos_text} please", "", f"Here: {eos_text} done", row=0)
    input_ids, labels = _encode(tokenizer, messages)
    assert input_ids.count(tokenizer.eos_token_id) == 1 + (
        tokenizer.bos_token_id == tokenizer.eos_token_id and special_ids(tokenizer).bos_id is not None
    )
    assert input_ids[-1] == tokenizer.eos_token_id


def test_saved_chat_template_reproduces_the_training_prompt(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conversation = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nShow work."},
    ]
    expected = encode_prompt(tokenizer, conversation, special_ids(tokenizer))
    rendered = reloaded.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(rendered) == expected
    # the full conversation tokenized through the template is the training sequence
    training_ids, _ = _encode(tokenizer, conversation[:2])
    assert list(reloaded.apply_chat_template(conversation[:2], tokenize=True, return_dict=False)) == training_ids
