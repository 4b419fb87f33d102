"""EVA (``init_lora_weights: eva``): A from the principal directions of each adapted layer's inputs on the training
data, and the ranks redistributed across layers by how much of those inputs' variance they explain.

PEFT builds the adapter as usual (B = 0), then :func:`hf_lora_recipe.inits.eva_data_pass.initialize_eva` runs the base
(adapters off, eval mode, no gradients) over the trainer's own training batches - the dataloader ``train`` itself
will read, on every process, gathered across processes as DDP would see them - while PEFT's ``get_eva_state_dict``
fits an incremental SVD to every target layer's inputs at the supervised positions (labels != -100) until its top
components stop moving between batches (cosine similarity >= tau, 0.99). A is set to the top components (orthonormal
rows), B stays 0, so step 0 is still the base. The rank budget (r x adapted modules) goes to the components with the
largest explained variance ratio, at most rho x r = 2r per layer (a layer that gets none loses its adapter), and
each layer's alpha is scaled with its rank, which keeps alpha/r. PEFT records the ranks as
``rank_pattern``/``alpha_pattern`` in the adapter config, so the saved adapter loads with its own shapes anywhere.

Bounded: PEFT cycles the dataloader until every layer converges; here at most ``eva_data_pass.MAX_BATCHES`` forward passes
(replaying the batches already read when the data has fewer), and a run whose components have not converged by
then stops with the layers named rather than train on components that are still moving.

The training itself is unchanged: the random states are restored after the pass (the trainer's sampler and
dropout draw from them) and the pass's dataloader is dropped, so the data order - and the data digest the
trainer prints - are those of the same run without EVA.

Saved: the step-0 A of every layer (rank 0 included) in ``output_dir/eva_state/eva_state.safetensors``, written by
the main process (whole, then renamed into place). A resumed run loads it rather than redoing the pass: the ranks are a
discrete choice among near-equal variances, which another machine's floating-point rounding may flip, and a
checkpoint only loads into exactly its own shapes. ``push`` never uploads a sub-folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

from hf_lora_recipe.inits.base import LoraInit, shards_weights
from hf_lora_recipe.inits.eva_data_pass import initialize_eva
from hf_lora_recipe.inits.eva_state import EVA_STATE, check_eva, saved_rank_range, saved_ranks
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, peft_target_modules


# What EVA was not verified with, and why: refused at recipe load
NOT_WITH = {
    "use_dora": "DoRA's magnitudes are set from W + s B A before EVA replaces A and the ranks, which is not verified",
    "use_rslora": "PEFT scales each layer's alpha by its new rank / r, which keeps alpha/r, not rsLoRA's alpha/sqrt(r)",
    "train_template_tokens": "PEFT's EVA pass hooks the trained token rows (embedding, LM head) as if they were LoRA "
    "layers and fails on their inputs",
    "streaming": "the EVA pass would read the stream's first batches an extra time before training (and count them "
    "in the stream's tally)",
}


class Eva(LoraInit):
    names: ClassVar[tuple[str, ...]] = ("eva",)
    summary = (
        "A from the top principal components of each layer's inputs on the training data (a bounded pass before "
        "step 1), ranks redistributed across layers (total r x modules, at most 2r each)"
    )
    folders: ClassVar[tuple[str, ...]] = (EVA_STATE,)
    final_after_trainer: ClassVar[bool] = True  # A and the ranks come from the trainer's own batches

    def validate(self, recipe: Recipe) -> None:
        for key, reason in NOT_WITH.items():
            if getattr(recipe, key):
                raise RecipeError(
                    f"init_lora_weights: eva with {key}: true is not supported: {reason}; set {key} false, or use "
                    "init_lora_weights true or gaussian"
                )

    def check_engine(self, recipe: Recipe, engine_name: str) -> None:
        if shards_weights(engine_name):
            raise RecipeError(
                "init_lora_weights: eva under FSDP or DeepSpeed is not supported: its data pass hooks every "
                "adapted layer's whole input and replaces whole A matrices (with new shapes) before the "
                "engine wraps the model, which sharded weights do not allow; launch on one GPU or with DDP "
                "(accelerate_configs/multi_gpu.yaml), or use init_lora_weights true or gaussian"
            )

    def targets_match(self, saved: list[str], wanted: list[str]) -> bool:
        # EVA saves the modules it kept (full names, or the shortest endings that tell them apart): each one of ours
        return all(any(target == name or target.endswith("." + name) for name in wanted) for target in saved)

    def peft_kwargs(self, recipe: Recipe) -> dict[str, Any]:
        return {"init_lora_weights": "eva", "eva_config": eva_config()}

    def before_adapter(self, model: Any, recipe: Recipe, config: Any, data: Any) -> int:
        from hf_lora_recipe.model.loading import resolve_targets

        # the modules that get an adapter before the pass: EVA's rank budget is r for each
        return sum(len(names) for names in resolve_targets(model, peft_target_modules(recipe)).values())

    def verify(self, model: Any, recipe: Recipe, layers: list[tuple[str, Any]], before: Any) -> None:
        super().verify(model, recipe, layers, before)  # B = 0
        check_eva(model, recipe, layers, before)  # before: the modules adapted before the pass (its rank budget)

    def after_trainer(self, trainer: Any, recipe: Recipe, checkpoint: str | None) -> None:
        initialize_eva(trainer, recipe, checkpoint)

    def check_saved(self, directory: Path, recipe: Recipe) -> dict[str, int]:
        return saved_ranks(directory)  # each layer's own rank, from its rank_pattern

    def card_line(self, recipe: dict[str, Any], output_dir: str) -> str | None:
        # the ranks EVA gave the layers: from the step-0 state the run keeps beside its checkpoints
        found = saved_rank_range(output_dir)
        ranks = f"ranks {found[0]}-{found[1]} per layer, total {found[2]}" if found else "ranks per layer"
        return (
            f"EVA init (A from the training data's principal input directions; {ranks}, see rank_pattern in "
            "adapter_config.json)"
        )

    def plan_notes(self, recipe: Recipe) -> list[tuple[str, str]]:
        return [
            (
                "init_lora_weights eva: the per-layer ranks come from a pass over the training data before step 1 "
                f"(total r x modules, at most {2 * recipe.lora_r} per layer): the trainable parameters above "
                "assume r everywhere",
                "train logs the ranks EVA chose and the resulting trainable count",
            )
        ]


def eva_config() -> Any:
    """PEFT's ``EvaConfig`` (its defaults: rho 2, tau 0.99, label mask, no whitening, alpha scaled with the rank)."""
    from peft import EvaConfig

    # PEFT advises building A and B on the meta device until the data pass fills them (low_cpu_mem_usage); they are
    # built as usual here (r x (in + out) numbers per layer), so the trainer exists, and batches, before the pass
    warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem_usage=False")
    return EvaConfig()
