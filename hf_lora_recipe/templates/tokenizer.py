"""Load the tokenizer and make it agree with the token layout we train on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_lora_recipe.files import write_text_atomically
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.templates.formats import FORMATS, missing_markers
from hf_lora_recipe.templates.llama2 import chat_template, is_llama2_template, special_ids


_PROBE = "[INST] probe [/INST]"


def _chunk_matches_in_context(tokenizer: Any) -> bool:
    """Does a text chunk tokenize the same alone as right after a special token?

    We train on chunks tokenized alone; ``apply_chat_template`` tokenizes the rendered string, where each
    chunk follows a BOS/EOS. They must agree or the inference prompt is off by one token from training.
    """
    special = tokenizer.eos_token
    alone = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    in_context = tokenizer(special + _PROBE, add_special_tokens=False)["input_ids"]
    return in_context[1:] == alone and in_context[:1] == [tokenizer.eos_token_id]


def load_tokenizer(
    name_or_path: str, revision: str = "main", trust_remote_code: bool = False, template: str = "llama2"
) -> Any:
    """The base's tokenizer with the chosen chat template installed and a pad token set.

    ``template``: ``llama2`` (the seed's layout), ``native`` (the tokenizer's own), a family's format
    (templates/formats.py) or a ``.jinja`` file's path.
    """
    from transformers import AutoTokenizer

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if template != "native" and not _chunk_matches_in_context(tokenizer) and hasattr(tokenizer, "legacy"):
        # transformers 5 Llama/SentencePiece tokenizers drop the word-start marker after a special token
        # ("<s>[" instead of "<s>▁["); legacy mode keeps it, which is also how Llama 2 itself was trained, and
        # lets a template's pieces tokenize as its whole text does
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, legacy=True, **kwargs)
    if template == "llama2":
        if not _chunk_matches_in_context(tokenizer):
            raise ValueError(
                f"tokenizer of {name_or_path} tokenizes text differently after a special token; "
                "the chat template could not reproduce the training prompt"
            )
        tokenizer.chat_template = chat_template(uses_bos=_llama2_ids(tokenizer).bos_id is not None)
    else:
        _install_template(tokenizer, name_or_path, template)
    if tokenizer.pad_token is None:
        # Padding positions carry label -100, so the pad id never enters the loss; unk avoids aliasing EOS.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def _llama2_ids(tokenizer: Any) -> Any:
    """BOS/EOS as the llama2 layout uses them, whatever template the tokenizer shipped with."""
    shipped, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        return special_ids(tokenizer)
    finally:
        tokenizer.chat_template = shipped


def _install_template(tokenizer: Any, name_or_path: str, template: str) -> None:
    """``native`` keeps the tokenizer's own template; a ``.jinja`` path replaces it. Either must reproduce
    ``apply_chat_template`` token for token, or the inference prompt would differ from the training one."""
    from hf_lora_recipe.templates.jinja import PROBE_CONVERSATION, encode_templated

    if template == "native":
        if not tokenizer.chat_template or is_llama2_template(tokenizer.chat_template):
            raise RecipeError(
                f"chat_template: native, but the tokenizer of {name_or_path} has no chat template of "
                "its own; use chat_template: llama2 or a .jinja file"
            )
    elif template in FORMATS:
        missing = missing_markers(tokenizer, template)
        if missing:
            raise RecipeError(
                f"chat_template {template}: the tokenizer of {name_or_path} has no special token "
                f"{', '.join(missing)}, so the format's markers would train as text; use native or llama2"
            )
        tokenizer.chat_template = FORMATS[template].jinja
    else:
        path = Path(template)
        if not path.is_file():
            raise RecipeError(f"chat_template: {template} does not exist; give llama2, native or a .jinja file")
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RecipeError(f"chat_template: cannot read {template} ({error})") from None
    ids = special_ids(tokenizer)
    probe = [m for m in PROBE_CONVERSATION if m["role"] != "system"][:2]
    ours = encode_templated(tokenizer, [probe[:1]], ids, generation_prompt=True)[0][0]
    theirs = tokenizer.apply_chat_template(probe[:1], tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    trained = encode_templated(tokenizer, [probe], ids)[0][0]
    if ours != list(theirs) or trained[: len(ours)] != ours:
        raise RecipeError(
            f"chat_template {template}: the tokenizer of {name_or_path} tokenizes the template's text differently "
            "in pieces than whole, so training could not match apply_chat_template; use chat_template: llama2"
        )


def tokenizer_for(recipe: Recipe) -> Any:
    return load_tokenizer(
        recipe.model_name_or_path, recipe.model_revision, recipe.trust_remote_code, recipe.chat_template
    )


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Save with the chat template, keeping legacy mode: transformers does not record it by itself."""
    from hf_lora_recipe.upstream.transformers import tokenizers_os_error

    try:
        tokenizer.save_pretrained(directory)
    except Exception as error:  # noqa: BLE001 - only tokenizers' bare I/O Exception is re-raised as what it is
        os_error = tokenizers_os_error(error, str(Path(directory) / "tokenizer.json"))
        if os_error is None:
            raise
        raise os_error from None
    if getattr(tokenizer, "legacy", False):
        config_path = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["legacy"] = True
        write_text_atomically(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
