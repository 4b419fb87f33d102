"""Any Jinja chat template - the tokenizer's own (``chat_template: native``) or a ``.jinja`` file - as token ids
and labels, with the guarantees of the seed's ``[INST]`` layout.

The template is rendered with a placeholder in place of every message's content, so we know exactly which
characters the template wrote and which are data. The rendered text is cut at the special tokens the template
wrote (they become their ids); each run of text between them is tokenized on its own with special-token strings
kept as text, and an assistant's content starts a run of its own. That is what the tokenizer does to the
generation prompt ``apply_chat_template(..., add_generation_prompt=True)`` - it splits at special tokens first -
so every assistant turn is trained after exactly the tokens it is generated after, and a literal ``<|im_end|>``
typed in a row stays text. (Earlier turns inside a multi-turn prompt can tokenize differently from a whole-string
render on tokenizers whose pre-tokenizer merges whitespace across the boundary, e.g. GPT-NeoX's ``"\n\n"``;
Llama 3's and SmolLM2's tokenizers do not.) A token is supervised when it overlaps an
assistant's content, and so is everything from there up to and including the end-of-turn token that closes the
turn: the loss is on assistant turns and their end-of-turn token only.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hf_lora_recipe.recipe.schema import RecipeError


IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips


@dataclass(frozen=True)
class SpecialIds:
    """How a tokenizer's chat template lays out a conversation, in token ids.

    ``eos_id`` is the end-of-turn token: it closes every assistant turn, is supervised there (it teaches the
    model to stop) and is what generation stops at - EOS for ``llama2``, e.g. ``<|im_end|>`` for ChatML or
    ``<|eot_id|>`` for Llama 3. ``layout`` is ``llama2`` (the seed's chunk layout below) or ``template`` (any other
    Jinja chat template, encoded by :func:`encode_templated`); ``control_ids`` are the special tokens the template
    writes, none of which may be supervised except the end-of-turn token that closes an assistant turn.
    """

    bos_id: int | None  # None for tokenizers that add no BOS (GPT-NeoX, Llama 3 base without one)
    eos_id: int
    layout: str = "llama2"
    control_ids: tuple[int, ...] = ()


PROBE_CONVERSATION = [
    {"role": "system", "content": "probe system"},
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "probe answer"},
    {"role": "user", "content": "probe follow-up"},
    {"role": "assistant", "content": "probe second answer"},
]


PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never in real text, and untouched by `| trim`
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except RecipeError:  # the probe's time limit
        raise
    except Exception as error:  # noqa: BLE001 - jinja's TemplateError, or raise_exception() inside the template
        roles = "/".join(m["role"] for m in messages)
        raise RecipeError(f"the chat template refused a {roles} conversation: {error}") from None


def _special_pattern(tokenizer: Any) -> re.Pattern[str]:
    """The added tokens the tokenizer splits a string at, longest first (so ``<|im_end|>`` beats ``<|im``)."""
    tokens = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else re.compile("(?!)")


def _pieces(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[tuple[str, str]]:
    """The rendered conversation as (kind, text): kind is ``template``, ``special`` or the message's role."""
    stripped = [{**m, "content": m["content"].strip()} for m in messages]
    placeholders = [{"role": m["role"], "content": PLACEHOLDER.format(i)} for i, m in enumerate(stripped)]
    rendered = _render(tokenizer, placeholders, generation_prompt)
    found = [int(match.group(1)) for match in _PLACEHOLDER.finditer(rendered)]
    if found != list(range(len(messages))):
        raise RecipeError(
            "the chat template does not print every message's content once, unchanged and in order (it drops, "
            "repeats or rewrites some), so hf-lora-recipe cannot tell prompt from response: use chat_template: "
            "llama2 or a .jinja template that prints each message's content"
        )
    special = _special_pattern(tokenizer)
    pieces: list[tuple[str, str]] = []
    position = 0
    for match in [*_PLACEHOLDER.finditer(rendered), None]:
        template_text = rendered[position : match.start() if match else len(rendered)]
        cursor = 0
        for token in special.finditer(template_text):
            if token.start() > cursor:
                pieces.append(("template", template_text[cursor : token.start()]))
            pieces.append(("special", token.group()))
            cursor = token.end()
        if cursor < len(template_text):
            pieces.append(("template", template_text[cursor:]))
        if match:
            message = stripped[int(match.group(1))]
            pieces.append((message["role"], message["content"]))
            position = match.end()
    return pieces


def _runs(pieces: list[tuple[str, str]]) -> list[tuple[str, Any]]:
    """Consecutive text pieces joined into one run (tokenized together, as in the whole string); each text run
    carries the character spans of assistant content in it."""
    runs: list[tuple[str, Any]] = []
    for kind, text in pieces:
        if kind == "special":
            runs.append(("special", text))
            continue
        if not runs or runs[-1][0] != "text" or kind == "assistant":
            # An assistant's content starts a run of its own: the model generates it after the generation prompt
            # tokenized alone, so that is how it is trained (some tokenizers merge "\n\n" + "Hello" otherwise)
            runs.append(("text", ["", []]))
        run = runs[-1][1]
        if kind == "assistant":
            run[1].append((len(run[0]), len(run[0]) + len(text)))
        run[0] += text
    return runs


def _encode_runs(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    backend = tokenizer.backend_tokenizer
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True  # text is data: a typed "<|im_end|>" is never the control token
    try:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = previous


def encode_templated(
    tokenizer: Any, conversations: list[list[dict[str, str]]], ids: SpecialIds, generation_prompt: bool = False
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of conversations through the tokenizer's chat template (one tokenizer call per batch).

    With ``generation_prompt`` the conversations end on a user turn and the ids end with the template's
    generation prompt, exactly as ``apply_chat_template(..., add_generation_prompt=True)`` writes them.
    """
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise RecipeError(
            "chat_template native/.jinja needs a fast (Rust) tokenizer; this one is slow-only: "
            "use chat_template: llama2"
        )
    all_runs = [_runs(_pieces(tokenizer, messages, generation_prompt)) for messages in conversations]
    texts = [run[0] for runs in all_runs for kind, run in runs if kind == "text"]
    encoded = iter(_encode_runs(tokenizer, texts) if texts else [])
    all_input_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    for runs in all_runs:
        input_ids: list[int] = []
        labels: list[int] = []
        closing = False  # an assistant turn ended: what follows up to its end-of-turn token is supervised
        for kind, run in runs:
            if kind == "special":
                token_id = tokenizer.convert_tokens_to_ids(run)
                input_ids.append(token_id)
                labels.append(token_id if closing else IGNORE_INDEX)
                if closing and token_id != ids.eos_id:
                    raise RecipeError(
                        f"the chat template closes an assistant turn with {run!r}, not its end-of-turn "
                        f"token {tokenizer.convert_ids_to_tokens(ids.eos_id)!r}"
                    )
                closing = False
                continue
            text, spans = run
            token_ids, offsets = next(encoded)
            if spans and text[spans[-1][1] :].strip():
                raise RecipeError(
                    f"the chat template writes {text[spans[-1][1] :].strip()[:30]!r} after an assistant's "
                    "content, before the end-of-turn token: only whitespace may come between"
                )
            for token_id, (start, end) in zip(token_ids, offsets):
                inside = any(start < b and end > a or (start == end and a <= start < b) for a, b in spans)
                closing_space = bool(spans) and start >= spans[-1][1]  # whitespace before the end-of-turn token
                input_ids.append(token_id)
                labels.append(token_id if inside or closing_space else IGNORE_INDEX)
            closing = bool(spans)
        if closing and not generation_prompt:
            raise RecipeError(
                "the chat template writes no end-of-turn token after the last assistant turn: "
                "the model could never learn to stop"
            )
        all_input_ids.append(input_ids)
        all_labels.append(labels)
    return all_input_ids, all_labels


PROBE_SECONDS = 30  # a probe conversation renders in milliseconds; a template still looping after this never ends


@contextlib.contextmanager
def probe_time_limit(seconds: float) -> Iterator[None]:
    """Stop the probe render of a template that does not finish (a loop with no end, a 10^10-step nested range)
    with one line; in the main thread only (where signals are delivered), else unlimited."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RecipeError(
            f"the chat template did not finish rendering a 2-turn probe conversation in {seconds:g} s (it is "
            "rendered to find where its text ends and each message begins): check its loops"
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def templated_ids(tokenizer: Any) -> SpecialIds:
    """The end-of-turn token is the special token the template writes right after an assistant's content."""
    with probe_time_limit(PROBE_SECONDS):
        return _templated_ids(tokenizer)


def _templated_ids(tokenizer: Any) -> SpecialIds:
    conversation = [m for m in PROBE_CONVERSATION if m["role"] != "system"][:2]
    pieces = _pieces(tokenizer, conversation, generation_prompt=False)
    after = list(pieces[[k for k, _ in pieces].index("assistant") + 1 :])
    while after and after[0][0] == "template" and not after[0][1].strip():
        after = after[1:]
    if not after or after[0][0] != "special":
        raise RecipeError(
            "the chat template closes an assistant turn with no special token (no end-of-turn such as "
            "<|im_end|> or <|eot_id|>): the model could not learn to stop; use chat_template: llama2"
        )
    try:
        probe = _pieces(tokenizer, PROBE_CONVERSATION, generation_prompt=False)
    except RecipeError:  # a template that takes no system turn (it raises on one)
        probe = _pieces(tokenizer, PROBE_CONVERSATION[1:], generation_prompt=False)
    control = sorted({tokenizer.convert_tokens_to_ids(text) for kind, text in probe if kind == "special"})
    return SpecialIds(
        bos_id=None, eos_id=tokenizer.convert_tokens_to_ids(after[0][1]), layout="template", control_ids=tuple(control)
    )
