"""An Ollama Modelfile for an exported GGUF: ``FROM`` the base (or the merged file), ``ADAPTER`` the LoRA GGUF,
``TEMPLATE`` the adapter's chat template in Ollama's Go-template syntax, and its end-of-turn token as the stop.

The Go template is derived, not hand-written per family: the chat template is rendered with placeholders for
each turn's content, which yields the text it writes before and after a system, user and assistant turn, the
generation prompt, and whether a system message is folded into the first user turn (Llama 2, Mistral, Gemma).
Those pieces become one ``range .Messages`` template. Before it is written, the pieces are replayed in Python
(:func:`render_like_ollama`, the same logic as the Go template) on sample conversations and compared with the
chat template's own rendering; a template that is not a sequence of per-turn pieces is refused rather than
approximated. tests/test_gguf_modelfile.py executes the written template with Go's text/template, the engine
Ollama uses, on the same conversations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hf_lora_recipe.recipe.schema import RecipeError


_CONTENT = "\ue000{}\ue001"  # private-use characters: never in real text, and untouched by `| trim`
SYSTEM, USER, ASSISTANT, FOLLOW_UP = (_CONTENT.format(n) for n in range(4))

# Conversations the derived template must reproduce exactly (every one ends with a user turn: what is served)
SAMPLE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Is this review positive or negative? A warm, clever film."}],
    [
        {"role": "system", "content": "You label movie reviews."},
        {"role": "user", "content": "Review: dull and far too long."},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please.\nJust one word."},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
    ],
]


@dataclass(frozen=True)
class TurnPieces:
    """What a chat template writes around each turn's content."""

    begin: str  # written before the first turn
    runtime_bos: str  # the template's BOS, left out of ``begin`` because llama.cpp/Ollama add it themselves
    system: (
        tuple[str, str] | None
    )  # (before, after) a system turn of its own; None when folded into the first user turn
    folded_system: tuple[str, str]  # (before, after) the system text inside the first user turn, when folded
    default_system: str | None  # the system text the template writes when a conversation has none
    first_user: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation_prompt: str


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError, or raise_exception() inside the template
        raise RecipeError(
            f"the adapter's chat template cannot render a conversation ({error}): cannot write a Modelfile"
        ) from None


def _split(text: str, marker: str, what: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise RecipeError(
            f"the adapter's chat template does not write each {what} once: cannot derive an Ollama template"
        )
    before, _, after = text.partition(marker)
    return before, after


def _after(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise RecipeError(
            f"the adapter's chat template renders a {what} differently from its first turn: cannot derive an Ollama template"
        )
    return text[len(prefix) :]


def turn_pieces(tokenizer: Any, runtime_adds_bos: bool) -> TurnPieces:
    """The per-turn pieces of the tokenizer's chat template (module docstring); ``runtime_adds_bos``: the GGUF's
    ``tokenizer.ggml.add_bos_token``, when llama.cpp/Ollama put the BOS in front themselves."""
    user, assistant, follow_up, system = (
        {"role": "user", "content": USER},
        {"role": "assistant", "content": ASSISTANT},
        {"role": "user", "content": FOLLOW_UP},
        {"role": "system", "content": SYSTEM},
    )
    one = _render(tokenizer, [user], False)
    prompt = _render(tokenizer, [user], True)
    answered = _render(tokenizer, [user, assistant], False)
    two = _render(tokenizer, [user, assistant, follow_up], False)
    generation_prompt = _after(prompt, one, "generation prompt")
    assistant_before, assistant_after = _split(_after(answered, one, "second turn"), ASSISTANT, "assistant turn")
    bos = tokenizer.bos_token or ""
    # a BOS that also opens turns is a turn marker (SmolLM2's <|im_start|>), not the text's beginning
    opens_turns = bos and bos in generation_prompt + assistant_before + assistant_after
    begin = bos if bos and one.startswith(bos) and not opens_turns else ""
    first_before, first_after = _split(one[len(begin) :], USER, "user turn")
    user_before, user_after = _split(_after(two, answered, "follow-up"), FOLLOW_UP, "follow-up")
    if user_after != first_after:
        raise RecipeError(
            "the adapter's chat template closes user turns differently: cannot derive an Ollama template"
        )
    try:
        with_system = _render(tokenizer, [system, user], False)
    except RecipeError:  # a template with no system role: a system message is then never written
        with_system = None
    system_pieces, folded, default_system = None, ("", ""), None
    if with_system is not None:
        rest = _after(with_system, begin, "system turn")
        alone = rest[: len(rest) - len(one) + len(begin)]
        # a default system turn the template writes when the conversation has none (SmolLM2's): it becomes
        # the Modelfile's SYSTEM, which Ollama puts in front of a conversation without a system message
        lead = first_before.removesuffix(user_before)
        own = rest.removesuffix(USER + first_after).removesuffix(user_before)
        if rest.endswith(one[len(begin) :]) and SYSTEM in alone:
            system_pieces = _split(alone, SYSTEM, "system turn")
        elif lead != first_before and SYSTEM in own and rest.endswith(user_before + USER + first_after):
            system_pieces = _split(own, SYSTEM, "system turn")
            if not (lead.startswith(system_pieces[0]) and lead.endswith(system_pieces[1])):
                raise RecipeError(
                    "the adapter's chat template opens a conversation oddly: cannot derive an Ollama template"
                )
            default_system = lead[len(system_pieces[0]) : len(lead) - len(system_pieces[1])]
            first_before = user_before
        else:
            inside = _split(_after(rest, first_before, "system turn"), USER, "user turn")
            if inside[1] != first_after:
                raise RecipeError(
                    "the adapter's chat template folds the system text oddly: cannot derive an Ollama template"
                )
            folded = _split(inside[0], SYSTEM, "system text")
    dropped = begin if runtime_adds_bos and begin == bos else ""
    return TurnPieces(
        begin="" if dropped else begin,
        runtime_bos=dropped,
        system=system_pieces,
        folded_system=folded,
        default_system=default_system,
        first_user=(first_before, first_after),
        user=(user_before, user_after),
        assistant=(assistant_before, assistant_after),
        generation_prompt=generation_prompt,
    )


def render_like_ollama(pieces: TurnPieces, messages: list[dict[str, str]]) -> str:
    """What :func:`go_template` renders for ``messages`` (the same steps, in Python)."""
    text, folded, started = pieces.begin, "", False
    if pieces.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": pieces.default_system}, *messages]  # the Modelfile's SYSTEM
    for index, message in enumerate(messages):
        last = index == len(messages) - 1
        role, content = message["role"], message["content"]
        if role == "system":
            if pieces.system is None:
                folded = content
            else:
                text += pieces.system[0] + content + pieces.system[1]
                started = True
        elif role == "user":
            before, after = pieces.user if started else pieces.first_user
            if folded:
                before += pieces.folded_system[0] + folded + pieces.folded_system[1]
                folded = ""
            text += before + content + after + (pieces.generation_prompt if last else "")
            started = True
        elif role == "assistant":
            text += pieces.assistant[0] + content + ("" if last else pieces.assistant[1])
            started = True
    return text


def _go(text: str) -> str:
    """``text`` as a Go template string literal (JSON's escapes are Go's, for the characters a template holds)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(pieces: TurnPieces) -> str:
    """The Ollama TEMPLATE: one pass over ``.Messages``, as :func:`render_like_ollama`."""
    if pieces.system is None:
        system_branch = "{{- $folded = .Content }}"
    else:
        system_branch = f"{_go(pieces.system[0])}{{{{ .Content }}}}{_go(pieces.system[1])}{{{{- $started = true }}}}"
    fold = f"{_go(pieces.folded_system[0])}{{{{ $folded }}}}{_go(pieces.folded_system[1])}"
    return (
        f"{_go(pieces.begin)}"
        '{{- $folded := "" }}{{- $started := false }}'
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{- if eq .Role "system" }}' + system_branch + ""
        '{{- else if eq .Role "user" }}'
        f"{{{{- if $started }}}}{_go(pieces.user[0])}{{{{- else }}}}{_go(pieces.first_user[0])}{{{{- end }}}}"
        f'{{{{- if $folded }}}}{fold}{{{{- $folded = "" }}}}{{{{- end }}}}'
        f"{{{{ .Content }}}}{_go(pieces.user[1])}"
        f"{{{{- if $last }}}}{_go(pieces.generation_prompt)}{{{{- end }}}}{{{{- $started = true }}}}"
        '{{- else if eq .Role "assistant" }}'
        f"{_go(pieces.assistant[0])}{{{{ .Content }}}}{{{{- if not $last }}}}{_go(pieces.assistant[1])}{{{{- end }}}}"
        "{{- $started = true }}"
        "{{- end }}{{- end }}"
    )


def check_pieces(tokenizer: Any, pieces: TurnPieces) -> None:
    """The pieces reproduce the chat template on every sample conversation (module docstring)."""
    for messages in SAMPLE_CONVERSATIONS:
        try:
            expected = _render(tokenizer, messages, True)
        except RecipeError:  # a template with no system role
            continue
        if pieces.runtime_bos + render_like_ollama(pieces, messages) != expected:
            raise RecipeError(
                "the adapter's chat template is not a sequence of per-turn pieces an Ollama template can express "
                f"(a {'/'.join(m['role'] for m in messages)} conversation differs): pass --no_modelfile"
            )


def modelfile(source: str, adapter: str | None, pieces: TurnPieces, stops: list[str]) -> str:
    """The Modelfile text: paths relative to the Modelfile's folder, as ``ollama create -f`` resolves them."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    if pieces.default_system is not None:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return "\n".join(lines) + "\n"
