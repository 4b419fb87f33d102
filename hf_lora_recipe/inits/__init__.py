"""The LoRA adapter on the base (adapter.py) and initialisations beyond PEFT's default: EVA, PiSSA/OLoRA.

The train pipeline calls what they need at fixed points; :func:`check_engine` is the first of those hooks.
"""

from __future__ import annotations

from hf_lora_recipe.recipe.schema import Recipe


def check_engine(recipe: Recipe, engine_name: str) -> None:
    """The recipe's init can run under this launch's engine, or a one-line refusal before anything loads."""
    from hf_lora_recipe.inits.eva import check_eva_possible
    from hf_lora_recipe.inits.pissa_olora import check_conversion_possible

    check_conversion_possible(recipe, engine_name)  # PiSSA/OLoRA: the whole adapter and base on one process
    check_eva_possible(recipe, engine_name)  # EVA: whole layer inputs and whole A matrices
