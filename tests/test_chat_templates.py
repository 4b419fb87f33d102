"""Templates other than the seed's: SmolLM2's own ChatML (``chat_template: native``) and a Llama-3-style header
template given as a ``.jinja`` file, on every row of the shared Alpaca and OpenAssistant samples."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hf_lora_recipe.data.label_audit import supervised_spans
from hf_lora_recipe.data.pipeline import build_sft_dataset
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.formats import FORMATS
from hf_lora_recipe.templates.llama2 import IGNORE_INDEX, encode_conversations, encode_prompt, special_ids
from hf_lora_recipe.templates.tokenizer import load_tokenizer, save_tokenizer

from .conftest import shared_asset


LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
HEADER_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_style_tokenizer(tmp_path_factory):
    """GPT-NeoX's byte-level BPE (Llama 3's family of behaviour) with Llama 3's header tokens and a .jinja file."""
    folder = tmp_path_factory.mktemp("llama3-style")
    base = AutoTokenizer.from_pretrained(shared_asset("tokenizers/gpt-neox-20b"))
    base.add_special_tokens({"additional_special_tokens": HEADER_TOKENS})
    base.save_pretrained(folder)
    template = folder / "llama3.jinja"
    template.write_text(LLAMA3_STYLE)
    return load_tokenizer(str(folder), template=str(template))


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_base):
    return load_tokenizer(str(smollm2_base), template="native")


# Each family's format on the shared tokenizer of its kind: byte-level BPE (Qwen, Llama 3) or SentencePiece
# (Gemma, Mistral, Phi-3's Llama tokenizer), holding the format's markers as special tokens as the family's own does
FORMAT_TOKENIZERS = {
    "chatml": "gpt-neox-20b",
    "llama3": "gpt-neox-20b",
    "gemma": "llama2",
    "mistral": "llama2",
    "phi3": "llama2",
}
assert set(FORMAT_TOKENIZERS) == set(FORMATS)


_FORMAT_TOKENIZERS: dict = {}


def format_tokenizer(name: str, tmp_path_factory) -> object:
    """The shared tokenizer of the format's kind, holding its markers as special tokens, with the format installed."""
    if name not in _FORMAT_TOKENIZERS:
        folder = tmp_path_factory.mktemp(name)
        base = AutoTokenizer.from_pretrained(shared_asset(f"tokenizers/{FORMAT_TOKENIZERS[name]}"))
        base.add_special_tokens({"additional_special_tokens": list(FORMATS[name].markers)})
        base.save_pretrained(folder)
        _FORMAT_TOKENIZERS[name] = load_tokenizer(str(folder), template=name)
    return _FORMAT_TOKENIZERS[name]


@pytest.fixture(params=list(FORMATS))
def family_format(request, tmp_path_factory):
    return format_tokenizer(request.param, tmp_path_factory)


@pytest.fixture(params=["smollm2-native", "llama3-style-jinja", *FORMATS])
def templated(request, tmp_path_factory):
    names = {"smollm2-native": "smollm2_tokenizer", "llama3-style-jinja": "llama3_style_tokenizer"}
    if request.param in names:
        return request.getfixturevalue(names[request.param])
    return format_tokenizer(request.param, tmp_path_factory)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]
# each family's documented rendering of CONVERSATION with the generation prompt (templates/formats.py: source)
DOCUMENTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "{bos}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "{bos}[INST] Be brief.\n\nHi [/INST]Hello{eos}[INST] Bye [/INST]",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\nBye<|end|>\n"
    "<|assistant|>\n",
}


def test_each_family_format_renders_as_documented(family_format):
    name = next(n for n in FORMATS if family_format.chat_template == FORMATS[n].jinja)
    rendered = family_format.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    expected = DOCUMENTED[name].format(bos=family_format.bos_token or "", eos=family_format.eos_token)
    assert rendered == expected


def test_a_family_format_needs_its_markers_as_special_tokens():
    with pytest.raises(
        RecipeError, match=r"^chat_template llama3: the tokenizer of .* has no special token <\|start_header_id\|>"
    ):
        load_tokenizer(str(shared_asset("tokenizers/gpt-neox-20b")), template="llama3")


def _specials(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values()]


def _check(example: dict, tokenizer, max_length: int) -> None:
    """The masking invariants for a template layout, checked independently of the audit's code."""
    ids = special_ids(tokenizer)
    input_ids, labels, messages = example["input_ids"], example["labels"], example["messages"]
    assert len(input_ids) == len(labels) <= max_length
    responses = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    spans = supervised_spans(labels)
    truncated = example["full_length"] > max_length
    assert spans and (len(spans) == len(responses) or truncated and len(spans) <= len(responses))
    for turn, (start, end) in enumerate(spans):
        if truncated and end == len(input_ids):
            continue
        assert input_ids[end - 1] == ids.eos_id  # every assistant turn closes with its supervised end-of-turn
        assert tokenizer.decode(input_ids[start : end - 1]).strip() == responses[turn]
        # no template token (turn markers, BOS, role headers) is supervised
        assert not set(input_ids[start : end - 1]) & set(ids.control_ids)
        assert labels[start - 1] == IGNORE_INDEX and input_ids[start - 1] != ids.eos_id
    if truncated or any(s in m["content"] for m in messages for s in _specials(tokenizer)):
        return
    # each assistant turn is trained after exactly its generation prompt; the first one is what
    # apply_chat_template(add_generation_prompt=True) writes, and on SmolLM2 (and Llama 3) every one is
    for turn, (start, _) in enumerate(spans):
        upto = [i for i, m in enumerate(messages) if m["role"] == "assistant"][turn]
        assert input_ids[:start] == encode_prompt(tokenizer, messages[:upto], ids)
        if turn == 0 or tokenizer.name_or_path.endswith("smollm2-135m-instruct-q4_1"):
            prompt = tokenizer.apply_chat_template(
                messages[:upto], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            assert list(prompt) == input_ids[:start]


@pytest.mark.parametrize("data_file", ["alpaca_en_demo.json", "oasst2_trees_sample.jsonl"])
def test_masks_exact_on_every_row(data_file, templated):
    path = shared_asset(f"data/{data_file}")
    dataset, report = build_sft_dataset(
        Recipe(dataset_name=str(path), dataset_format="auto", max_length=4096), templated
    )
    assert report.examples_out > 0
    for example in dataset:
        _check(example, templated, 4096)


def test_masks_exact_when_truncated(templated):
    path = shared_asset("data/oasst2_trees_sample.jsonl")
    dataset, report = build_sft_dataset(
        Recipe(dataset_name=str(path), dataset_format="oasst", max_length=96), templated
    )
    assert report.truncated > 0
    for example in dataset:
        _check(example, templated, 96)


def test_end_of_turn_is_the_templates_not_the_eos(llama3_style_tokenizer, smollm2_tokenizer):
    assert llama3_style_tokenizer.convert_ids_to_tokens(special_ids(llama3_style_tokenizer).eos_id) == "<|eot_id|>"
    assert llama3_style_tokenizer.eos_token == "<|endoftext|>"  # the tokenizer's EOS is not what closes a turn
    assert smollm2_tokenizer.convert_ids_to_tokens(special_ids(smollm2_tokenizer).eos_id) == "<|im_end|>"


def test_literal_special_tokens_in_a_row_stay_text(templated):
    ids = special_ids(templated)
    end = templated.convert_ids_to_tokens(ids.eos_id)
    messages = [
        {"role": "user", "content": f"Type {end} and <|start_header_id|> please"},
        {"role": "assistant", "content": f"Here: {end} <|im_start|> done"},
    ]
    [input_ids], [labels] = encode_conversations(templated, [messages], ids)
    spans = supervised_spans(labels)
    assert len(spans) == 1 and input_ids[spans[0][1] - 1] == ids.eos_id
    supervised = input_ids[spans[0][0] : spans[0][1] - 1]
    assert ids.eos_id not in supervised and not set(supervised) & set(ids.control_ids)
    assert templated.decode(supervised) == f"Here: {end} <|im_start|> done"
    # the typed strings occur as text, so the sequence holds exactly the template's own control tokens
    plain = [{"role": m["role"], "content": "x"} for m in messages]
    [plain_ids], _ = encode_conversations(templated, [plain], ids)
    control = lambda sequence: [t for t in sequence if t in ids.control_ids]  # noqa: E731
    assert control(input_ids) == control(plain_ids)


def test_saved_template_reproduces_the_training_prompt(templated, tmp_path):
    save_tokenizer(templated, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conversation = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nShow work."},
    ]
    ids = special_ids(reloaded)
    assert ids == special_ids(templated)
    # multi-turn prompts agree whole only where the tokenizer never merges whitespace across a turn boundary
    # (SmolLM2, Llama 3; not GPT-NeoX's "\n\n"): see hf_lora_recipe/templates/jinja.py
    boundary_stable = templated.name_or_path.endswith("smollm2-135m-instruct-q4_1")
    for prompt in (conversation[:1], conversation) if boundary_stable else (conversation[:1],):
        rendered = reloaded.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(rendered["input_ids"]) == encode_prompt(templated, prompt, ids)


def test_template_choices_fail_clearly(tmp_path, llama2_tokenizer):
    llama2 = str(shared_asset("tokenizers/llama2"))
    with pytest.raises(RecipeError, match="has no chat template of its own"):
        load_tokenizer(llama2, template="native")
    with pytest.raises(RecipeError, match="does not exist"):
        load_tokenizer(llama2, template=str(tmp_path / "missing.jinja"))
    dropping = tmp_path / "drops.jinja"  # prints only the last message: prompt and response can't be told apart
    dropping.write_text("{{ messages[-1]['content'] }}{{ eos_token }}")
    with pytest.raises(RecipeError, match="does not print every message"):
        load_tokenizer(llama2, template=str(dropping))
    unclosed = tmp_path / "unclosed.jinja"  # nothing closes an assistant turn: the model could never stop
    unclosed.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(RecipeError, match="no special token"):
        load_tokenizer(llama2, template=str(unclosed))


def test_a_template_that_never_finishes_its_probe_is_stopped_in_one_line(tmp_path, monkeypatch):
    """A nested 10^10-step loop (each range within jinja's sandbox cap): the probe render is cut off and named."""
    import time

    import hf_lora_recipe.templates.jinja as jinja

    monkeypatch.setattr(jinja, "PROBE_SECONDS", 1)
    endless = tmp_path / "endless.jinja"
    endless.write_text(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    started = time.monotonic()
    with pytest.raises(RecipeError, match=r"^the chat template did not finish rendering a 2-turn probe conversation"):
        load_tokenizer(str(shared_asset("tokenizers/llama2")), template=str(endless))
    assert time.monotonic() - started < 10
