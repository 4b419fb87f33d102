"""TRL's SFTTrainer, configured from the recipe, with the two things this recipe adds: a loss path per
backend, and a record of what each rank read.

``lm_head_loss``: TRL computes the loss with its fused, tiled LM-head kernel, which never materialises the
(batch x length x vocab) logits - the right trade on a GPU, where the 128k-vocabulary logits of Llama 3 cost
~3 GB. On a CPU that kernel is most of the step (fp32 tiles forward and backward) and memory is not the
constraint, so ``auto`` uses the model's own cross-entropy there. Both normalise by the supervised tokens of
the whole accumulated, all-process batch (``num_items_in_batch``), so the choice changes speed, not numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from .config import Recipe, RecipeError
from .modeling import available_attention, fsdp_checkpoints_activations, liger_active

# Recipe keys that are SFTConfig fields with the same name and meaning: passed through unchanged.
SFT_CONFIG_KEYS = (
    "output_dir", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "num_train_epochs", "max_steps", "optim", "adam_beta1", "adam_beta2", "weight_decay", "max_grad_norm", "bf16",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to", "seed", "train_sampling_strategy",
)

# transformers 5.24 renamed TrainingArguments' gradient_checkpointing* to activation_checkpointing* (the old
# names warn); older 5.x releases know only the old ones.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
                 else "gradient_checkpointing")


def uses_fused_loss(lm_head_loss: str) -> bool:
    return lm_head_loss == "fused" or (lm_head_loss == "auto" and torch.cuda.is_available())


def padding_free(recipe: Recipe) -> bool:
    """``auto``: on the CPU always; on a GPU only with flash-attention, whose varlen kernel keeps its speed."""
    if recipe.padding_free != "auto":
        return recipe.padding_free == "true"
    return not torch.cuda.is_available() or available_attention(recipe.attn_implementation).startswith("flash_attention")


def speed_line(recipe: Recipe) -> str:
    """What the run chose for speed, logged once at the start."""
    return (f"loss: {'TRL fused LM head (no full logits)' if uses_fused_loss(recipe.lm_head_loss) else 'model cross-entropy'}; "
            f"attention: {available_attention(recipe.attn_implementation)}; padding-free: {padding_free(recipe)}; "
            f"liger-kernel: {'on' if liger_active(recipe.use_liger_kernel) else 'off'}")


def check_report_to(recipe: Recipe) -> None:
    """Every tracker in ``report_to`` is one transformers knows and is installed: checked before the model loads."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if recipe.report_to in (["none"], ["all"]):
        return
    installed = set(get_available_reporting_integrations())
    for name in recipe.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(f"report_to: unknown tracker {name!r}; transformers supports "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or all / none)")
        if name not in installed:
            raise RecipeError(f"report_to: {name} is not installed here; pip install {name} (or report_to none)")


def _known_name(key: str, value: str, known: list[str]) -> None:
    if value not in known:
        import difflib

        close = [name for name in known if name.startswith(value)] or difflib.get_close_matches(value, known, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        shown = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
        raise RecipeError(f"{key}: {value!r} is not a name transformers knows; {guess}(one of {shown})")


def check_names(recipe: Recipe) -> None:
    """``lr_scheduler_type`` and ``optim`` are names transformers knows: checked before the model loads (the
    trainer would only refuse them once everything is loaded)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    _known_name("lr_scheduler_type", recipe.lr_scheduler_type, [s.value for s in SchedulerType])
    _known_name("optim", recipe.optim, [o.value for o in OptimizerNames])
    check_report_to(recipe)


def trainer_config(recipe: Recipe, accumulation: int, has_eval: bool = False) -> SFTConfig:
    return SFTConfig(
        **{key: getattr(recipe, key) for key in SFT_CONFIG_KEYS},
        gradient_accumulation_steps=accumulation,  # derived from global_batch_size and the world size
        # Under FSDP with fsdp_activation_checkpointing, FSDP checkpoints each wrapped layer itself.
        **{CHECKPOINTING: recipe.gradient_checkpointing and not fsdp_checkpoints_activations(),
           f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},  # reentrant checkpointing breaks LoRA under DDP
        max_length=None,  # our data step already truncated to recipe.max_length
        eval_strategy="steps" if has_eval else "no",
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        use_cpu=not torch.cuda.is_available(),
        # Our dataset already holds input_ids and labels, masked and truncated exactly as `preview` shows.
        dataset_kwargs={"skip_prepare_dataset": True},
        ddp_find_unused_parameters=False,
        # Examples concatenated into one row with restarting position_ids: no padding is computed, and the
        # attention mask built from the position ids keeps examples from seeing each other.
        padding_free=padding_free(recipe),
        use_liger_kernel=liger_active(recipe.use_liger_kernel),
    )


class RecipeTrainer(SFTTrainer):
    def __init__(self, *args: Any, fused_loss: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.examples_seen = 0
        self.positions = self.tokens = self.supervised = 0  # processed, non-padding, trained-on
        self._digest = hashlib.sha256()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a draft README.md into output_dir at every checkpoint; ours is written once, at the end,
        and a README.md we did not write is never touched."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Packed rows are kept apart by a mask derived from position_ids, which transformers only builds
        # when no KV cache exists: never let a model config with use_cache=True merge examples.
        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, *args, **kwargs):
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        real = input_ids if mask is None else input_ids[mask.bool()]
        self._digest.update(real.detach().cpu().numpy().tobytes())
        self.positions += int(input_ids.numel())
        self.tokens += int(real.numel())
        self.supervised += int((inputs["labels"] != -100).sum())
        position_ids = inputs.get("position_ids")
        self.examples_seen += int((position_ids == 0).sum()) if mask is None and position_ids is not None else int(input_ids.shape[0])
        return super().training_step(model, inputs, *args, **kwargs)

    def data_line(self) -> str:
        padding = 1 - self.tokens / max(self.positions, 1)
        return (f"consumed {self.examples_seen} examples, data digest {self._digest.hexdigest()[:12]}; "
                f"{self.supervised:,} supervised of {self.positions:,} processed positions ({padding:.1%} padding)")


def build_trainer(
    recipe: Recipe, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any | None, accumulation: int,
    callbacks: list[Any],
) -> RecipeTrainer:
    return RecipeTrainer(
        model=model,
        fused_loss=uses_fused_loss(recipe.lm_head_loss),
        args=trainer_config(recipe, accumulation, has_eval=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
