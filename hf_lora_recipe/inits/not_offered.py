"""PEFT initialisations refused with the reason, rather than built wrong: each needs more than this recipe holds."""

from __future__ import annotations

from typing import ClassVar

from hf_lora_recipe.inits.base import LoraInit
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


class LoftQ(LoraInit):
    names: ClassVar[tuple[str, ...]] = ("loftq",)
    offered = False
    summary = "not offered: it needs scipy and a CUDA device, and the unquantized base at initialisation"

    def validate(self, recipe: Recipe) -> None:
        raise RecipeError(
            f"init_lora_weights: loftq is not supported: {self.summary.removeprefix('not offered: ')}; use one of the "
            "others (hf-lora-recipe train --help lists them)"
        )
