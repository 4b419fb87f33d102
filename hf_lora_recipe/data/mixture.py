"""Several datasets mixed into one training set (the recipe's ``datasets:``).

Each source is read, formatted, audited and cleaned exactly as a lone ``dataset_name`` would be (its own format,
bad-row handling and audit, its rows named in its own errors); only then are the prepared sources mixed, with
``datasets``' own functions and the recipe's seed: ``weight`` interleaves (``interleave_datasets``, each next
example drawn from a source with probability weight / sum of weights), ``fraction`` takes that share of each
source's examples and concatenates, neither concatenates everything. A ``source`` column (the entry's index)
stays on every example, so the report can show what the mixture really holds, not what was asked for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from hf_lora_recipe.recipe.schema import Recipe


SOURCE_COLUMN = "source"


def source_recipes(recipe: Recipe) -> list[Recipe]:
    """One single-dataset recipe per ``datasets`` entry (the recipe itself when there are none)."""
    if not recipe.datasets:
        return [recipe]
    return [
        dataclasses.replace(
            recipe,
            dataset_name=s["name"],
            dataset_format=s["format"],
            dataset_train_split=s["split"],
            dataset_config=s["config"],
            dataset_revision=s["revision"],
            datasets=[],
        )
        for s in recipe.datasets
    ]


def source_label(source: dict) -> str:
    """How the report names a source: the file or folder name, or the Hub id, with a split other than train."""
    name = source["name"]
    shown = Path(name).name if Path(name).expanduser().exists() else name
    return (
        shown
        + (f"[{source['split']}]" if source["split"] != "train" else "")
        + (f"({source['config']})" if source["config"] else "")
    )


def dataset_versions(recipe: Recipe) -> dict[str, str]:
    """What exactly was trained on (``sources.dataset_version``), for every source of a mixture."""
    from hf_lora_recipe.data.readers import dataset_version

    parts = [dataset_version(single) for single in source_recipes(recipe)]
    if len(parts) == 1:
        return parts[0]
    return {
        "name": " + ".join(part["name"] for part in parts),
        "version": "; ".join(f"{part['name']}: {part['version']}" for part in parts),
    }


def check_sources(recipe: Recipe) -> None:
    """Every local source's path and split exist (reads no rows): the pre-flight check of the data."""
    from hf_lora_recipe.data.readers import split_files
    from hf_lora_recipe.recipe.schema import RecipeError

    for index, single in enumerate(source_recipes(recipe)):
        try:
            split_files(single)
        except RecipeError as error:  # name the entry: "dataset_name" is not what a mixture's user typed
            if not recipe.datasets:
                raise
            message = str(error).replace("dataset_name ", "name ", 1).replace("dataset_train_split:", "split:", 1)
            raise RecipeError(f"datasets[{index}]: {message}") from None


def source_index(recipe: Recipe, wanted: str) -> int:
    """The ``datasets`` entry a user named (its name as written, its label, or its 0-based index)."""
    from hf_lora_recipe.recipe.schema import RecipeError

    labels = [source_label(s) for s in recipe.datasets]
    if wanted in [str(index) for index in range(len(labels))]:
        return int(wanted)
    found = [index for index, source in enumerate(recipe.datasets) if wanted in (source["name"], labels[index])]
    if len(found) > 1:
        named = ", ".join(f"{index}: {recipe.datasets[index]['name']}" for index in found)
        raise RecipeError(f"--source {wanted} names {len(found)} of this recipe's datasets ({named}); give its index")
    if found:
        return found[0]
    known = ", ".join(labels) or "none: it has a single dataset_name"
    raise RecipeError(
        f"--source {wanted}: not one of this recipe's datasets ({known}); give a name or a 0-based index"
    )


def _with_source(dataset: Any, index: int) -> Any:
    return dataset.add_column(SOURCE_COLUMN, np.full(len(dataset), index, dtype=np.int32).tolist())


def mix(recipe: Recipe, parts: list[Any]) -> Any:
    """The prepared sources mixed as the recipe asks, each example tagged with its source's index (in one table:
    the counts read its columns directly)."""
    return _mixed(recipe, parts).flatten_indices()


def _mixed(recipe: Recipe, parts: list[Any]) -> Any:
    from datasets import concatenate_datasets, interleave_datasets

    tagged = [_with_source(part, index) for index, part in enumerate(parts)]
    features = tagged[0].features
    tagged = [part if part.features == features else part.cast(features) for part in tagged]
    weights = [s["weight"] for s in recipe.datasets]
    if weights[0] is not None:
        probabilities = [w / sum(weights) for w in weights]
        check_expansion(recipe, [len(part) for part in tagged], probabilities)
        return interleave_datasets(
            tagged, probabilities=probabilities, seed=recipe.seed, stopping_strategy=recipe.mixture_stopping_strategy
        )
    fractions = [s["fraction"] for s in recipe.datasets]
    if fractions[0] is not None:
        tagged = [
            part.shuffle(seed=recipe.seed).select(range(max(1, round(fraction * len(part)))))
            for part, fraction in zip(tagged, fractions)
        ]
    return concatenate_datasets(tagged)


MAX_EXPANSION = 100  # a weighted mixture may repeat its sources up to this many times their total rows


def check_expansion(recipe: Recipe, rows: list[int], probabilities: list[float]) -> None:
    """Refuse weights that would make ``interleave_datasets`` build a huge mixture: sampling stops when every
    source is used up (all_exhausted) or the first is (first_exhausted), after about rows / probability draws."""
    from hf_lora_recipe.recipe.schema import RecipeError

    draws = [count / p if p > 0 else float("inf") for count, p in zip(rows, probabilities)]
    planned = max(draws) if recipe.mixture_stopping_strategy == "all_exhausted" else min(draws)
    if planned > MAX_EXPANSION * sum(rows):
        worst = draws.index(planned)
        raise RecipeError(
            f"datasets: the weights would make the {recipe.mixture_stopping_strategy} mixture about {planned:,.0f} "
            f"examples, over {MAX_EXPANSION}x its {sum(rows):,} rows (datasets[{worst}] {source_label(recipe.datasets[worst])}: "
            f"{rows[worst]} rows at a {probabilities[worst]:.2g} share); bring the weights closer, or give each "
            "source a fraction"
        )


def shares(recipe: Recipe, mixed: Any, reports: list[Any]) -> list[dict[str, Any]]:
    """Per source: what was asked, what it held after its own cleaning, and its realised share of the mixture's
    examples and supervised tokens."""
    source = mixed.data.column(SOURCE_COLUMN).to_numpy()
    supervised = mixed.data.column("num_supervised").to_numpy()
    count = len(recipe.datasets)
    examples = np.bincount(source, minlength=count)
    tokens = np.bincount(source, weights=supervised, minlength=count)
    weights = [s["weight"] for s in recipe.datasets]
    asked = [w / sum(weights) for w in weights] if weights[0] is not None else [None] * count
    return [
        {
            "source": source_label(s),
            "format": s["format"],
            "weight": s["weight"],
            "fraction": s["fraction"],
            "asked_share": asked[i],
            "examples_in": reports[i].examples_in,
            "examples_kept": reports[i].examples_out,
            "tokens": reports[i].total_tokens,
            "examples_used": int(examples[i]),
            "share_of_examples": float(examples[i] / max(len(mixed), 1)),
            "share_of_supervised_tokens": float(tokens[i] / max(tokens.sum(), 1)),
        }
        for i, s in enumerate(recipe.datasets)
    ]


def how(recipe: Recipe) -> str:
    """The mixing rule, as the report states it."""
    if recipe.datasets[0]["weight"] is not None:
        return f"interleaved by weight (datasets.interleave_datasets, seed {recipe.seed}, {recipe.mixture_stopping_strategy})"
    if recipe.datasets[0]["fraction"] is not None:
        return f"a fraction of each source (seed {recipe.seed}), concatenated"
    return "every example of every source, concatenated"
