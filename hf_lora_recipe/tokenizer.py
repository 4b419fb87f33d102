"""Load the tokenizer and make it agree with the token layout we train on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Recipe
from .template import chat_template, special_ids

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


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False) -> Any:
    """The base's tokenizer with the seed chat template installed and a pad token set."""
    from transformers import AutoTokenizer

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if not _chunk_matches_in_context(tokenizer) and hasattr(tokenizer, "legacy"):
        # transformers 5 Llama/SentencePiece tokenizers drop the word-start marker after a special token
        # ("<s>[" instead of "<s>▁["); legacy mode keeps it, which is also how Llama 2 itself was trained.
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, legacy=True, **kwargs)
    if not _chunk_matches_in_context(tokenizer):
        raise ValueError(
            f"tokenizer of {name_or_path} tokenizes text differently after a special token; "
            "the chat template could not reproduce the training prompt"
        )
    ids = special_ids(tokenizer)
    tokenizer.chat_template = chat_template(uses_bos=ids.bos_id is not None)
    if tokenizer.pad_token is None:
        # Padding positions carry label -100, so the pad id never enters the loss; unk avoids aliasing EOS.
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


def tokenizer_for(recipe: Recipe) -> Any:
    return load_tokenizer(recipe.model_name_or_path, recipe.model_revision, recipe.trust_remote_code)


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """Save with the chat template, keeping legacy mode: transformers does not record it by itself."""
    tokenizer.save_pretrained(directory)
    if getattr(tokenizer, "legacy", False):
        config_path = Path(directory) / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["legacy"] = True
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
