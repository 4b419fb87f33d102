"""The Ollama Modelfile's TEMPLATE renders every conversation exactly as the adapter's chat template does: checked
in Python (the pieces replayed) and by Go's text/template, the engine Ollama runs it with (tests/go/ollama_render.go,
which adds the Modelfile's SYSTEM as Ollama's chat endpoint does)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from hf_lora_recipe.recipe.schema import RecipeError
from hf_lora_recipe.shipping.ollama import (
    SAMPLE_CONVERSATIONS,
    check_pieces,
    go_template,
    modelfile,
    render_like_ollama,
    turn_pieces,
)
from hf_lora_recipe.templates.formats import FORMATS

from .conftest import REPO_ROOT
from .test_chat_templates import format_tokenizer


TEMPLATES = ["llama2-default", "smollm2-native", *FORMATS]

# Conversations beyond the samples export checks itself with: longer, and with text that looks like template syntax
MORE_CONVERSATIONS = [
    [
        {"role": "system", "content": 'Quote "exactly".'},
        {"role": "user", "content": "{{ .Content }} is not a template here; nor is {% this %}."},
        {"role": "assistant", "content": "Understood:\n- one\n- two"},
        {"role": "user", "content": "Backslash \\ and tab\tend"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Last"},
    ]
]


@pytest.fixture(params=TEMPLATES)
def chat_tokenizer(request, tmp_path_factory, llama2_tokenizer):
    if request.param == "llama2-default":
        return llama2_tokenizer
    if request.param == "smollm2-native":
        from hf_lora_recipe.templates.tokenizer import load_tokenizer

        return load_tokenizer(str(request.getfixturevalue("smollm2_base")), template="native")
    return format_tokenizer(request.param, tmp_path_factory)


def _expected(tokenizer, pieces, messages) -> str:
    """The chat template's own rendering, less the BOS the runtime adds itself."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(pieces.runtime_bos)
    return rendered[len(pieces.runtime_bos) :]


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory) -> str:
    """tests/go/ollama_render.go, built once."""
    if shutil.which("go") is None:
        message = "Go is not installed (apt-get install golang-go): the Modelfile's template cannot be executed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    env = {**os.environ, "GOPATH": os.environ.get("GOPATH", str(binary.parent / "gopath")), "GO111MODULE": "off"}
    source = str(REPO_ROOT / "tests" / "go" / "ollama_render.go")
    done = subprocess.run(["go", "build", "-o", str(binary), source], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return str(binary)


def _go_render(renderer: str, template: str, system: str | None, conversations: list) -> list[str]:
    done = subprocess.run(
        [renderer],
        input=json.dumps({"template": template, "system": system, "conversations": conversations}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("runtime_adds_bos", [True, False])
def test_the_derived_template_renders_every_conversation_as_the_chat_template(
    chat_tokenizer, runtime_adds_bos, go_renderer
):
    pieces = turn_pieces(chat_tokenizer, runtime_adds_bos)
    check_pieces(chat_tokenizer, pieces)
    conversations = SAMPLE_CONVERSATIONS + MORE_CONVERSATIONS
    rendered = _go_render(go_renderer, go_template(pieces), pieces.default_system, conversations)
    for messages, text in zip(conversations, rendered):
        expected = _expected(chat_tokenizer, pieces, messages)
        assert render_like_ollama(pieces, messages) == expected
        assert text == expected


def test_the_bos_the_runtime_adds_is_not_written_twice(llama2_tokenizer):
    # llama.cpp and Ollama put the BOS in front of a Llama 2 prompt themselves (the GGUF's add_bos_token)
    pieces = turn_pieces(llama2_tokenizer, runtime_adds_bos=True)
    assert pieces.runtime_bos == "<s>" and pieces.begin == ""
    first = render_like_ollama(pieces, SAMPLE_CONVERSATIONS[2])
    assert first.startswith("[INST] ") and first.count("<s>") == 1  # only the second turn's


def test_a_default_system_prompt_becomes_the_modelfiles_system(smollm2_base):
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_base), template="native")
    pieces = turn_pieces(tokenizer, runtime_adds_bos=False)
    assert pieces.default_system and "SmolLM" in pieces.default_system
    text = modelfile("./base.gguf", "./adapter-f16.gguf", pieces, ["<|im_end|>"])
    assert text.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter-f16.gguf"]
    assert f'SYSTEM """{pieces.default_system}"""' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_that_is_not_per_turn_is_refused(llama2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    llama2_tokenizer.save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # the turns written in reverse: no per-turn pieces reproduce it
    tokenizer.chat_template = (
        "{% for message in messages | reverse %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    )
    with pytest.raises(RecipeError, match="Ollama template"):
        check_pieces(tokenizer, turn_pieces(tokenizer, runtime_adds_bos=False))
