"""PiSSA and OLoRA: the step-0 adapter that lets the trained one be published as a plain adapter of the original base.

These initialisations move the base's principal part into the adapter (W_res = W - s B0 A0), so the trained
adapter (A, B) only means something on the residual base. PEFT converts it to one of the original base,
dW = s (B A - B0 A0) = s [B | -B0] [A ; A0], given (A0, B0): ``save_pretrained(...,
path_initial_model_for_weight_conversion=initial_adapter)``. The result is rank 2r, alpha 2 alpha (rsLoRA:
alpha sqrt(2)), ``init_lora_weights: true``. ``train`` saves (A0, B0) into ``output_dir/initial_adapter/`` before
the first step and keeps it there: a rerun that resumes (and trains past the end with a raised max_steps) builds
the same residual base and must convert against the same (A0, B0). ``push`` never uploads a sub-folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.files import write_atomically
from hf_lora_recipe.recipe.schema import BASE_REWRITING_INITS, Recipe, RecipeError, lora_init_family


INITIAL_ADAPTER = "initial_adapter"
PARTIAL = INITIAL_ADAPTER + ".partial"  # written here first, renamed into place: never a half-written initial adapter
# Float noise between two runs of one SVD/QR is ~1e-7 of |B0 A0|; another initialisation differs by > 1e-2.
SAME_INIT_TOLERANCE = 1e-4
NOTE = """# Initial adapter (not a usable adapter)

A0 and B0 of this run's {init} initialisation, saved at step 0 by hf-lora-recipe. The adapter in the folder above was
converted with them into a plain LoRA adapter of the original base; this one only serves that conversion (and the
check that a resumed run starts from the same initialisation). Do not load it as an adapter.
"""


def rewrites_base(recipe: Recipe) -> bool:
    """PiSSA (any ``pissa_niter_N``) or OLoRA: the base is rewritten, the adapter published converted."""
    return lora_init_family(recipe.init_lora_weights) in BASE_REWRITING_INITS


def initial_adapter_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / INITIAL_ADAPTER


def check_conversion_possible(recipe: Recipe, engine_name: str) -> None:
    """PiSSA/OLoRA's step-0 adapter and PEFT's conversion need the whole adapter and base on one process: refused
    under FSDP and DeepSpeed before anything loads (the recipe-only refusals are in ``recipe/schema.validate``)."""
    if rewrites_base(recipe) and (engine_name == "fsdp" or engine_name.startswith("zero")):
        raise RecipeError(
            f"init_lora_weights: {recipe.init_lora_weights} under FSDP or DeepSpeed is not supported: "
            "the step-0 adapter and PEFT's conversion need the whole adapter and base on one process; "
            "launch on one GPU or with DDP (accelerate_configs/ddp.yaml), or use init_lora_weights true "
            "or gaussian"
        )


def keep_initial_adapter(model: Any, recipe: Recipe, resumed: bool) -> None:
    """PiSSA/OLoRA only: save (A0, B0) before the first step (main process); on a resumed run, check that the
    fresh initialisation is the saved one (every process), or the final conversion would be wrong."""
    if not rewrites_base(recipe):
        return
    if resumed:
        check_same_initialisation(model, recipe)
    elif log.is_main_process():
        save_initial_adapter(model, recipe)


def save_initial_adapter(model: Any, recipe: Recipe) -> Path:
    """``output_dir/initial_adapter``: the adapter as initialised (safetensors), replacing any earlier one whole."""
    target = initial_adapter_dir(recipe)

    def write(partial: Path) -> None:
        model.save_pretrained(str(partial), safe_serialization=True)
        (partial / "README.md").write_text(NOTE.format(init=recipe.init_lora_weights))  # not PEFT's generic card

    # an earlier start's is replaced: this fresh start's checkpoints are converted with the new one
    write_atomically(target, write, partial=target.with_name(PARTIAL))
    log.info(
        f"{recipe.init_lora_weights}: initial adapter (A0, B0) saved to {target}; the final adapter is converted "
        "with it to a plain adapter of the original base"
    )
    return target


def check_same_initialisation(model: Any, recipe: Recipe) -> None:
    """The residual base this run built (W - s B0' A0') is the one the checkpoint was trained on (W - s B0 A0)."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    directory = initial_adapter_dir(recipe)
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        raise RecipeError(
            f"{directory} is missing, so the {recipe.init_lora_weights} adapter in the checkpoint cannot "
            "be converted to an adapter of the original base: pass --overwrite_output_dir true to "
            "train again from scratch"
        )
    saved = load_file(str(path))
    fresh = {k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_A." in k or ".lora_B." in k}
    if set(saved) != set(fresh):
        raise RecipeError(
            f"{directory} holds another adapter's layers than this recipe builds: pass "
            "--overwrite_output_dir true to train again from scratch"
        )
    worst, where = 0.0, ""
    with torch.no_grad():
        for key_a in sorted(k for k in fresh if ".lora_A." in k):
            key_b = key_a.replace(".lora_A.", ".lora_B.")
            # B0 A0, not the factors: an SVD may flip a singular vector's sign in both, which changes nothing
            now = fresh[key_b].float() @ fresh[key_a].float()
            before = saved[key_b].to(now.device).float() @ saved[key_a].to(now.device).float()
            difference = ((now - before).abs().max() / before.abs().max().clamp_min(1e-30)).item()
            if difference > worst:
                worst, where = difference, key_a.rsplit(".lora_A.", 1)[0]
    if worst > SAME_INIT_TOLERANCE:
        raise RecipeError(
            f"the {recipe.init_lora_weights} initialisation of this rerun differs from the one saved in "
            f"{directory} (B0 A0 of {where} by {worst:.2g} of its largest entry), so the checkpoint's "
            "adapter would be converted against the wrong base: resume with the same recipe (seed) "
            "on the same kind of machine, or pass --overwrite_output_dir true to train again from "
            "scratch"
        )
    log.info(
        f"{recipe.init_lora_weights}: this rerun's initialisation equals {directory} (largest relative difference "
        f"of B0 A0: {worst:.1g})"
    )
