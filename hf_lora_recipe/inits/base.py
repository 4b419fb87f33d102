"""One LoRA initialisation as the train pipeline sees it: the ``init_lora_weights`` values it answers to and its hooks.

The pipeline calls every hook at a fixed point, for every init; a hook an init does not need keeps the default
here, which is PEFT's plain behaviour (B = 0 at step 0, saved as trained). In pipeline order:

    validate        recipe load      refusals the recipe alone shows (one line, before anything loads)
    check_engine    launch           refusals of this launch's engine (FSDP, DeepSpeed)
    check_resume    before loading   what a checkpoint's adapter_config.json must hold to resume with this init
    peft_kwargs     adapter          its LoraConfig fields
    before_adapter  adapter          work on the base before PEFT wraps it (a record, a data pass); its result
                                     comes back to ``verify``
    verify          step 0           the proof that step 0 is the base and PEFT built this init
    keep            step 0           what a resume or the final save needs of step 0, saved (or checked)
    after_trainer   trainer built    an init set from the trainer's own batches (its adapter is final only then)
    save_adapter    final save       an adapter saved otherwise than as trained (converted)
    check_saved     final save       the saved adapter's shapes, before it is published
    card_line       model card       how the card names it
    plan_notes      plan             what plan's counts do not show

A new init is one module in this folder with one subclass (found by :mod:`hf_lora_recipe.inits` at import), a test
and its section in docs/variants.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hf_lora_recipe.recipe.schema import Recipe


class LoraInit:
    """PEFT's default initialisation (Kaiming-uniform A, B = 0); every other init overrides what it changes."""

    names: ClassVar[tuple[str, ...]] = ()  # the init_lora_weights values it answers to (for --help, in order)
    summary: ClassVar[str] = ""  # one line: what it sets A and B to
    folders: ClassVar[tuple[str, ...]] = ()  # what it keeps in output_dir beside the checkpoints (never pushed)
    rank_factor: ClassVar[int] = 1  # the saved adapter's rank over lora_r
    final_after_trainer: ClassVar[bool] = False  # after_trainer, not add_adapter, finishes the adapter
    scores_trained_model: ClassVar[bool] = True  # the trained model is what users load (else: reload the saved one)
    offered: ClassVar[bool] = True  # False: named only to be refused with the reason (validate)

    def answers(self, value: str) -> bool:
        return value in self.names

    def validate(self, recipe: Recipe) -> None:
        """Refuse, in one line, what this init cannot do with the rest of the recipe."""

    def check_engine(self, recipe: Recipe, engine_name: str) -> None:
        """Refuse, in one line, an engine this init cannot run under (``ddp``, ``fsdp``, ``zero2``, ``zero3``)."""

    def check_resume(self, saved: dict[str, Any], recipe: Recipe) -> list[str]:
        """What differs between a checkpoint's ``adapter_config.json`` (``saved``) and this run, as
        ``"key old there, new here"``; the generic keys (r, targets) are compared by the caller."""
        value = self.peft_kwargs(recipe)["init_lora_weights"]
        if "init_lora_weights" in saved and saved["init_lora_weights"] != value:
            return [f"init_lora_weights {_shown(saved['init_lora_weights'])} there, {recipe.init_lora_weights} here"]
        return []

    def targets_match(self, saved: list[str], wanted: list[str]) -> bool:
        """A checkpoint's ``target_modules`` are this recipe's."""
        return set(saved) == set(wanted)

    def peft_kwargs(self, recipe: Recipe) -> dict[str, Any]:
        return {"init_lora_weights": peft_init_lora_weights(recipe.init_lora_weights)}

    def before_adapter(self, model: Any, recipe: Recipe, config: Any, data: Any) -> Any:
        """Work on the prepared base before ``get_peft_model`` (``config``: the LoraConfig; ``data``: the
        tokenized training set, or None). What it returns is handed to :meth:`verify`."""
        return None

    def verify(self, model: Any, recipe: Recipe, layers: list[tuple[str, Any]], before: Any) -> None:
        """Step 0 is the base: every adapter's B is zero."""
        for name, layer in layers:
            for adapter in layer.lora_B:
                if layer.lora_B[adapter].weight.abs().max() != 0:
                    raise RuntimeError(
                        f"{name}: lora_B is not zero at step 0 (init_lora_weights {recipe.init_lora_weights}): "
                        "the adapted model would not start at the base"
                    )

    def keep(self, model: Any, recipe: Recipe, resumed: bool) -> None:
        """Save what a later step needs of step 0 (main process), or on a resumed run check it is the same."""

    def after_trainer(self, trainer: Any, recipe: Recipe, checkpoint: str | None) -> None:
        """Finish the adapter from the trainer (only when :attr:`final_after_trainer`)."""

    def save_adapter(self, trainer: Any, recipe: Recipe, directory: Path, checkpoint: str | None) -> bool:
        """Write the final adapter into ``directory`` when it is not saved as trained (every process calls it);
        False: the caller saves it as trained."""
        return False

    def check_saved(self, directory: Path, recipe: Recipe) -> dict[str, int]:
        """Check the saved adapter's config; the layers whose rank is not ``lora_r x rank_factor``."""
        return {}

    def card_line(self, recipe: dict[str, Any], output_dir: str) -> str | None:
        """The model card's words for it (``recipe``: the saved recipe.yaml); None: plain LoRA."""
        value = recipe.get("init_lora_weights", "true")
        return None if value == "true" else f"init_lora_weights {value}"

    def plan_notes(self, recipe: Recipe) -> list[tuple[str, str]]:
        """(what plan's figures do not show, what to do or expect) pairs."""
        return []


def shards_weights(engine_name: str) -> bool:
    """FSDP or DeepSpeed: no process holds whole weights or whole adapter matrices."""
    return engine_name == "fsdp" or engine_name.startswith("zero")


def peft_init_lora_weights(value: str) -> bool | str:
    """An ``init_lora_weights`` value as LoraConfig takes it (``true`` is PEFT's boolean default)."""
    return True if value == "true" else value


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
