"""Are the chat template's special tokens trained in the base? Read from its safetensors, before the model loads.

An instruct template (ChatML's ``<|im_start|>``/``<|im_end|>``, Llama 3's ``<|eot_id|>``) put on a *base*
model often uses tokens whose embedding rows were never trained: all zero, or one vector shared by every
reserved token, or the embedding's mean. LoRA trains projections only, so such a row stays what it is: the
model cannot tell the turns apart, and a zero LM-head row gives its token the logit 0 whatever the context, so
the model never learns to stop. Training refuses that combination unless ``train_template_tokens`` also trains
those rows (PEFT ``trainable_token_indices``, see :func:`hf_lora_recipe.model.loading.trainable_token_targets`).

Only the rows of the template's tokens, the other special tokens' and an evenly spaced sample of ordinary rows
are read (``safe_open(...).get_slice(name)[ids]``), from a local folder or the Hub cache: megabytes, not the
model. The test is for *degenerate* rows, not for learned-vs-random ones: a random tiny model passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "embed_in.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight")
SAMPLE_ROWS = 1024  # ordinary rows read to know what a typical row looks like: the mean's error is ~3% of a row
OTHER_SPECIAL_ROWS = 2048  # other special tokens a template row is compared with (Llama 3 has 256 reserved)
# A row shorter than this share of the median row is "zero": trained rows of real models sit above ~50% of it
# (SmolLM2-135M: the shortest of 49,152 is 57%), random ones near 100%.
TINY = 0.1
# Closer than this share of the median distance to the mean, a row *is* the mean (a mean-initialised new
# token); trained rows of SmolLM2 are >= 70% of it away, random rows ~100%, and the sampled mean is ~3% off.
AT_MEAN = 0.1
# Two rows this close (same scale) are one vector: what untrained reserved tokens share (SmolLM2's 11 unused
# special tokens are bit-identical), while no ordinary row of SmolLM2 has a neighbour within 11% of it.
SAME = 0.01


@dataclass
class Suspect:
    token_id: int
    label: str  # ``'<|im_end|>' (id 2)``
    reasons: list[str]  # "embedding all zero", "LM head the same vector as '<unk>' (id 0)"

    def describe(self) -> str:
        return f"{self.label}: {', '.join(self.reasons)}"


@dataclass
class TemplateTokens:
    """What the check found for one base and template."""

    base: str
    labels: dict[int, str]  # the template's special tokens, id -> ``'<s>' (id 1)``
    suspects: list[Suspect] = field(default_factory=list)
    skipped: str | None = None  # why the rows were not read

    @property
    def token_ids(self) -> list[int]:
        return sorted(self.labels)

    def listing(self) -> str:
        return ", ".join(self.labels[i] for i in self.token_ids)

    def problem(self) -> str:
        return (
            f"model_name_or_path {self.base}: the chat template's special tokens look untrained in its weights "
            f"({'; '.join(s.describe() for s in self.suspects)}); LoRA trains only the projections, so the "
            "model could never learn to read or write them"
        )

    def fix(self, recipe: Recipe) -> str:
        trains = "set train_template_tokens: true (trains those embedding and LM-head rows too)"
        if recipe.chat_template == "llama2":
            return trains
        return f"use chat_template: llama2 (whose special tokens are BOS/EOS, which the base knows), or {trains}"


# ---------------------------------------------------------------- the base's tensors, file by file


def _locator(name: str, revision: str) -> Callable[[str], Path | None] | None:
    """A file of the base by name: from its folder, or from the Hub cache (never downloaded here)."""
    folder = Path(name)
    if folder.is_dir():
        return lambda filename: (folder / filename) if (folder / filename).is_file() else None
    if folder.exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        try:
            found = try_to_load_from_cache(name, filename, revision=revision)
        except ValueError:  # not a repo id: read_model_config says so first
            return None
        return Path(found) if isinstance(found, str) else None

    return cached


def weight_files(name: str, revision: str = "main") -> tuple[dict[str, Path], dict[str, Any]] | str:
    """(tensor name -> safetensors file, config.json) of a local base, or why they cannot be read cheaply."""
    locate = _locator(name, revision)
    where = name if Path(name).is_dir() else f"the local Hub cache for {name}"
    if locate is None:
        return f"{name} is not a model folder"
    index, single = locate("model.safetensors.index.json"), locate("model.safetensors")
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = {shard: locate(shard) for shard in set(weight_map.values())}
        if any(path is None for path in shards.values()):
            return f"some of its weight shards are not in {where}"
        files = {tensor: shards[shard] for tensor, shard in weight_map.items()}
    elif single is not None:
        from safetensors import safe_open

        with safe_open(single, "pt") as handle:
            files = dict.fromkeys(handle.keys(), single)
    else:
        return f"no safetensors weights in {where}"
    config_path = locate("config.json")
    config = json.loads(config_path.read_text()) if config_path is not None else {}
    return files, config


def _find(names: list[str], suffixes: tuple[str, ...]) -> str | None:
    """The tensor ending in the first suffix that matches, the shortest name first (``model.embed_tokens.weight``
    before a vision tower's ``...vision.embed_tokens.weight``)."""
    for suffix in suffixes:
        found = sorted((n for n in names if n == suffix or n.endswith("." + suffix)), key=len)
        if found:
            return found[0]
    return None


def _tied(config: dict[str, Any]) -> bool | None:
    for part in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in part:
            return bool(part["tie_word_embeddings"])
    return None


def _rows(path: Path, tensor: str, ids: list[int]) -> Any:
    """Rows ``ids`` of one tensor, as float32; nothing else of the file is read."""
    import torch
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        matrix = handle.get_slice(tensor)
        if not ids:
            return torch.empty(0, matrix.get_shape()[1])
        try:
            rows = matrix[ids]
        except (TypeError, ValueError):  # safetensors before list indexing: one row at a time
            rows = torch.cat([matrix[i : i + 1] for i in ids])
    return rows.float()


def _layout(path: Path, tensor: str) -> tuple[list[int], str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        matrix = handle.get_slice(tensor)
        return list(matrix.get_shape()), matrix.get_dtype()


# ---------------------------------------------------------------- the verdict


def degenerate_rows(
    rows: Any, row_ids: list[int], sample: Any, others: Any, other_ids: list[int], label: Callable[[int], str]
) -> list[str | None]:
    """For each of ``rows``: why it looks untrained, or None.

    ``sample`` holds ordinary rows of the same matrix (what a row looks like); ``others`` the rows a row must
    not coincide with (every special token's, ``other_ids``). Scales are relative - the median row length and
    the median distance from the mean - so the same thresholds hold for bf16 and fp32, tiny and large models.
    """
    import torch

    length = sample.norm(dim=1).median()
    mean = sample.mean(dim=0)
    spread = (sample - mean).norm(dim=1).median()
    verdicts: list[str | None] = []
    for row_id, row in zip(row_ids, rows):
        norm = row.norm()
        if not torch.isfinite(row).all():
            verdicts.append("not finite")
        elif norm == 0:
            verdicts.append("all zero")
        elif norm <= TINY * length:
            verdicts.append(f"near zero ({norm / length:.1%} of a typical row's length)")
        elif (row - mean).norm() <= AT_MEAN * spread:
            verdicts.append("the mean of all rows")
        else:
            distances = (others - row).norm(dim=1).tolist() if len(others) else []
            same = [label(i) for i, d in zip(other_ids, distances) if i != row_id and d <= SAME * spread]
            more = f" and {len(same) - 2} more" if len(same) > 2 else ""
            verdicts.append(f"the same vector as {', '.join(same[:2])}{more}" if same else None)
    return verdicts


def _special_ids(tokenizer: Any) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def inspect(recipe: Recipe, tokenizer: Any) -> TemplateTokens:
    """Read the template tokens' rows (embedding, and LM head when not tied) and judge each one."""
    from hf_lora_recipe.templates.llama2 import template_token_ids

    def label(i: int) -> str:
        return f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})"

    base = recipe.model_name_or_path
    ids = template_token_ids(tokenizer)
    found = TemplateTokens(base, {i: label(i) for i in ids})
    if not ids:
        found.skipped = "the chat template writes no special tokens"
        return found
    located = weight_files(base, recipe.model_revision)
    if isinstance(located, str):
        found.skipped = located
        return found
    files, config = located
    embedding = _find(list(files), EMBEDDING_SUFFIXES)
    if embedding is None:
        found.skipped = "no input-embedding tensor found in its weights"
        return found
    matrices = {"embedding": embedding}
    head = _find(list(files), HEAD_SUFFIXES)
    if (
        head is not None
        and head != embedding
        and _tied(config) is not True
        and _layout(files[head], head)[0] == _layout(files[embedding], embedding)[0]
    ):
        matrices["LM head"] = head  # an untied head has its own rows: zero there, and the token is never produced

    special = _special_ids(tokenizer)
    reasons: dict[int, list[str]] = {i: [] for i in ids}
    for what, tensor in matrices.items():
        shape, dtype = _layout(files[tensor], tensor)
        if len(shape) != 2 or dtype not in ("F16", "BF16", "F32", "F64"):
            found.skipped = f"{tensor} is not a plain {dtype} matrix"
            return found
        vocab = shape[0]
        for i in ids:
            if i >= vocab:
                reasons[i].append(f"no {what} row (it has {vocab})")
        inside = [i for i in ids if i < vocab]
        others = sorted(i for i in special if i < vocab)[:OTHER_SPECIAL_ROWS]
        sample = _rows(
            files[tensor], tensor, [i for i in range(0, vocab, max(1, vocab // SAMPLE_ROWS)) if i not in special]
        )
        verdicts = degenerate_rows(
            _rows(files[tensor], tensor, inside), inside, sample, _rows(files[tensor], tensor, others), others, label
        )
        for i, verdict in zip(inside, verdicts):
            if verdict:
                reasons[i].append(f"{what} {verdict}")
    found.suspects = [Suspect(i, found.labels[i], reasons[i]) for i in ids if reasons[i]]
    return found


# ---------------------------------------------------------------- where it runs: train and plan


def check_template_tokens(recipe: Recipe, tokenizer: Any) -> list[int] | None:
    """Train's guard, before the model loads: untrained template rows stop the run (one :class:`RecipeError`)
    unless ``train_template_tokens``; returns the token ids whose rows the adapter trains, or None."""
    from safetensors import SafetensorError

    from hf_lora_recipe.templates.llama2 import template_token_ids

    try:
        found = inspect(recipe, tokenizer)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # a broken file fails at load, in its own words
        found = TemplateTokens(recipe.model_name_or_path, {}, skipped=f"reading its embedding rows failed ({error})")
    if found.skipped:
        log.info(f"chat template tokens not checked in the base's weights: {found.skipped}")
    elif found.suspects and not recipe.train_template_tokens:
        raise RecipeError(f"{found.problem()}; {found.fix(recipe)}")
    elif found.suspects:
        log.info(f"chat template tokens untrained in the base: {'; '.join(s.describe() for s in found.suspects)}")
    else:
        log.info(f"chat template tokens {found.listing()}: their rows look trained")
    if not recipe.train_template_tokens:
        return None
    ids = found.token_ids or template_token_ids(tokenizer)
    if ids:
        log.info(
            f"train_template_tokens: the adapter also trains the embedding and LM-head rows of "
            f"{found.listing() or ids}"
        )
    return ids or None


def inspect_if_local(recipe: Recipe) -> TemplateTokens:
    """Plan's view: the check when the base's weights are local (a folder or the Hub cache), else why not.

    The tokenizer is only loaded once the weights are known to be there, so a plan for a base that is not on
    this machine stays a read of config.json.
    """
    from hf_lora_recipe.templates.tokenizer import tokenizer_for

    try:
        located = weight_files(recipe.model_name_or_path, recipe.model_revision)
        if isinstance(located, str):
            return TemplateTokens(recipe.model_name_or_path, {}, skipped=located)
        return inspect(recipe, tokenizer_for(recipe))
    except Exception as error:  # noqa: BLE001 - plan reports what it could not check; train stops on it
        return TemplateTokens(recipe.model_name_or_path, {}, skipped=f"cannot read it here: {error}")
