"""LoRA initialisations, one class each (:class:`hf_lora_recipe.inits.base.LoraInit`), and the adapter they build.

Every module of this folder is read once for its ``LoraInit`` subclasses: adding an init is adding a module. The
train pipeline reaches them only through :func:`init_for` and the hooks; ``adapter.py`` builds and proves the
adapter with them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from hf_lora_recipe.inits.base import LoraInit
from hf_lora_recipe.recipe.schema import KeyPlugins, Recipe, RecipeError, nearest


@functools.cache
def registered() -> tuple[LoraInit, ...]:
    """One instance of every init in this folder, in module order (the default first)."""
    found: list[LoraInit] = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "peft_default", m.name)):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for cls in vars(loaded).values():  # in the order the module defines them
            if inspect.isclass(cls) and issubclass(cls, LoraInit) and cls.__module__ == loaded.__name__ and cls.names:
                found.append(cls())
    return tuple(found)


def names() -> list[str]:
    """The values init_lora_weights accepts (--help lists them)."""
    return [name for init in registered() if init.offered for name in init.names]


def find(value: str) -> LoraInit | None:
    """The init answering to an ``init_lora_weights`` value; None for one this version does not know."""
    return next((init for init in registered() if init.answers(value)), None)


def init_for(recipe: Recipe) -> LoraInit:
    init = find(recipe.init_lora_weights)
    if init is None:
        known = names()
        raise RecipeError(
            f"init_lora_weights must be one of {', '.join(known)}; got {recipe.init_lora_weights!r} "
            f"(did you mean {nearest(recipe.init_lora_weights, known)!r}?)"
        )
    return init


def check_recipe(recipe: Recipe) -> None:
    """The recipe's init exists and refuses nothing in the rest of the recipe (at load, before anything loads)."""
    init_for(recipe).validate(recipe)


def check_engine(recipe: Recipe, engine_name: str) -> None:
    """The recipe's init can run under this launch's engine, or a one-line refusal before anything loads."""
    init_for(recipe).check_engine(recipe, engine_name)


def folders() -> set[str]:
    """Every folder an init keeps in output_dir (and its partial write), whatever the run's init."""
    return {name for init in registered() for folder in init.folders for name in (folder, folder + ".partial")}


# For the recipe parser: init_lora_weights' values come from this folder, and so does their check
RECIPE_KEY = KeyPlugins("init_lora_weights", names, check_recipe)
