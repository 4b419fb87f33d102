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

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hf_lora_recipe import log
from hf_lora_recipe.files import write_atomically
from hf_lora_recipe.inits.base import LoraInit, shards_weights
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, peft_target_modules


INITIAL_ADAPTER = "initial_adapter"
PARTIAL = INITIAL_ADAPTER + ".partial"  # written here first, renamed into place: never a half-written initial adapter
ADAPTER_FILE = "adapter_model.safetensors"
# Float noise between two runs of one SVD/QR is ~1e-7 of |B0 A0|; another initialisation differs by > 1e-2.
SAME_INIT_TOLERANCE = 1e-4
NOTE = """# Initial adapter (not a usable adapter)

A0 and B0 of this run's {init} initialisation, saved at step 0 by hf-lora-recipe. The adapter in the folder above was
converted with them into a plain LoRA adapter of the original base; this one only serves that conversion (and the
check that a resumed run starts from the same initialisation). Do not load it as an adapter.
"""


class BaseRewriting(LoraInit):
    """An init that moves part of each target weight into the adapter (W_res = W - s B0 A0): the base must be
    exact (no 4-bit), the whole model on one process, and the trained adapter is published converted."""

    folders: ClassVar[tuple[str, ...]] = (INITIAL_ADAPTER,)
    rank_factor: ClassVar[int] = 2  # [B | -B0] [A ; A0]
    scores_trained_model: ClassVar[bool] = False  # its base is the residual: users load the converted adapter
    title: ClassVar[str] = ""  # the card's name for it

    def validate(self, recipe: Recipe) -> None:
        init = recipe.init_lora_weights
        if recipe.load_in_4bit:
            raise RecipeError(
                f"init_lora_weights: {init} rewrites the base weights (W - s B0 A0), which a 4-bit base cannot hold "
                "exactly (PEFT refuses PiSSA there and re-quantizes for OLoRA, so the saved adapter would not match "
                "the base users load); set load_in_4bit false or use init_lora_weights true or gaussian"
            )
        for key, dropped in (("use_dora", "DoRA's magnitudes"), ("train_template_tokens", "the trained token rows")):
            if getattr(recipe, key):
                raise RecipeError(
                    f"init_lora_weights: {init} with {key}: true is not supported: PEFT's conversion to an adapter "
                    f"of the original base drops {dropped}, so the published adapter would not be the trained one; "
                    f"set {key} false, or init_lora_weights true or gaussian"
                )

    def check_engine(self, recipe: Recipe, engine_name: str) -> None:
        if shards_weights(engine_name):
            raise RecipeError(
                f"init_lora_weights: {recipe.init_lora_weights} under FSDP or DeepSpeed is not supported: "
                "the step-0 adapter and PEFT's conversion need the whole adapter and base on one process; "
                "launch on one GPU or with DDP (accelerate_configs/ddp.yaml), or use init_lora_weights true "
                "or gaussian"
            )

    def before_adapter(self, model: Any, recipe: Recipe, config: Any, data: Any) -> BaseRecord:
        import torch

        from hf_lora_recipe.distributed.engines import current_engine

        if torch.cuda.is_available() and not current_engine().shards_weights:
            # an SVD / QR of every target weight: minutes on the GPU the trainer moves the model to anyway, hours on
            # the CPU for an 8B base
            model.to(torch.device("cuda", log.local_rank()))
        return record_base(model, recipe)

    def verify(self, model: Any, recipe: Recipe, layers: list[tuple[str, Any]], before: Any) -> None:
        if before is None:
            raise RuntimeError(
                f"init_lora_weights {recipe.init_lora_weights}: no record of the base before the adapter rewrote "
                "it (build the model with add_adapter), so it cannot be checked"
            )
        check_conserved(model, recipe, before, layers)

    def keep(self, model: Any, recipe: Recipe, resumed: bool) -> None:
        """Save (A0, B0) before the first step (main process); a resumed run checks its fresh initialisation is
        the saved one (every process), or the final conversion would be wrong."""
        if resumed:
            check_same_initialisation(model, recipe)
        elif log.is_main_process():
            save_initial_adapter(model, recipe)

    def save_adapter(self, trainer: Any, recipe: Recipe, directory: Path, checkpoint: str | None) -> bool:
        if trainer.is_world_process_zero():  # never an unconverted copy: it only means something on the residual base
            save_converted_adapter(trainer, recipe, directory, checkpoint)
        return True

    def check_saved(self, directory: Path, recipe: Recipe) -> dict[str, int]:
        """PEFT's conversion doubles r and alpha (rsLoRA: alpha x sqrt(2), the same scaling) and sets init true."""
        import json

        config = json.loads((directory / "adapter_config.json").read_text())
        alpha = recipe.lora_alpha * (math.sqrt(2) if recipe.use_rslora else 2)
        if (
            config.get("init_lora_weights") is not True
            or config.get("r") != 2 * recipe.lora_r
            or not math.isclose(config.get("lora_alpha") or 0, alpha, rel_tol=1e-6)
        ):
            raise RuntimeError(
                f"{directory}: init_lora_weights {recipe.init_lora_weights} saved unconverted (init "
                f"{config.get('init_lora_weights')}, r {config.get('r')}, alpha {config.get('lora_alpha')}; "
                f"converted: true, {2 * recipe.lora_r}, {alpha:g}): it would only fit the residual base"
            )
        return {}

    def card_line(self, recipe: dict[str, Any], output_dir: str) -> str | None:
        # the conversion doubles r and alpha; with rsLoRA alpha x sqrt(2), which keeps alpha/sqrt(r)
        alpha = recipe["lora_alpha"] * (math.sqrt(2) if recipe.get("use_rslora") else 2)
        return (
            f"{self.title_for(str(recipe['init_lora_weights']))} init (saved converted: rank {2 * recipe['lora_r']}, "
            f"alpha {alpha:.4g}, a plain adapter of the original base)"
        )

    def title_for(self, value: str) -> str:
        return self.title


class PiSSA(BaseRewriting):
    names: ClassVar[tuple[str, ...]] = ("pissa", "pissa_niter_N")
    summary = "A and B from the base's principal singular vectors (pissa_niter_N: a randomized SVD of N iterations)"
    title = "PiSSA"

    def answers(self, value: str) -> bool:
        family, niter, iterations = value.partition("_niter_")
        return value == "pissa" or (family == "pissa" and bool(niter) and iterations.isdigit() and int(iterations) > 0)

    def title_for(self, value: str) -> str:
        return self.title + (f" (randomized SVD, {value.rsplit('_', 1)[-1]} iterations)" if value != "pissa" else "")


class OLoRA(BaseRewriting):
    names: ClassVar[tuple[str, ...]] = ("olora",)
    summary = "A and B from a QR decomposition of the base weight"
    title = "OLoRA"


# ---------------------------------------------------------------------------------------------- the step-0 proof


@dataclass
class BaseRecord:
    """What the base computed before it was rewritten, without copying a weight: each adapted layer's W v (fp32)
    for one fixed random v per input width, and the logits on a probe."""

    products: dict[int, tuple[Any, Any]]  # id(layer) -> (the layer, which PEFT keeps as base_layer; W v)
    vectors: dict[int, Any]  # input width -> v (CPU, fp32)
    input_ids: Any
    logits: Any  # fp32, eval mode, no grad


PROBE_TOKENS = 16

# (a) an untouched base moves W v by exactly 0; PiSSA/OLoRA move it by about a fifth of max |W v| on SmolLM2-135M.
MOVED_AT_LEAST = 1e-3

# (b) |(W_res + s B0 A0 - W) v| against |W_res| |v| + s |B0| |A0| |v|, row by row: the residual is rounded to the
# base's dtype (at most its unit roundoff, eps/2), the products summed in fp32 (1e-4 covers 14336-long rows); an
# initialisation that does not conserve the base is off by O(1).
CONSERVED_TOLERANCE = 1e-4

# (c) the step-0 logits' RMS difference against the original's RMS. fp32 agrees to float noise; in bf16 the layers
# round differently once the principal part runs through the adapter (a few percent), where a wrongly rewritten base
# is off by more than 100%. (b) is the exact check, (c) the end-to-end one.
LOGITS_TOLERANCE = 1e-4  # fp32

LOGITS_TOLERANCE_HALF = 0.1  # bf16, fp16


def _weight(layer: Any) -> Any:
    """The layer's weight as (out, in): GPT-2's Conv1D stores it transposed."""
    from transformers.pytorch_utils import Conv1D

    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _times(weight: Any, vector: Any) -> Any:
    return weight.float() @ vector.to(weight.device)


def record_base(model: Any, recipe: Recipe) -> BaseRecord:
    """:class:`BaseRecord` of the recipe's target layers; reads the weights once, keeps O(rows) numbers per layer.

    The random numbers come from a generator of their own: the global RNG (which ``pissa_niter_N`` and LoRA's A
    draw from after ``set_seed``) is left exactly where it was.
    """
    import torch

    from hf_lora_recipe.model.loading import resolve_targets

    generator = torch.Generator().manual_seed(recipe.seed)
    modules = dict(model.named_modules())
    layers = [
        modules[name] for names in resolve_targets(model, peft_target_modules(recipe)).values() for name in names
    ]
    products, vectors = {}, {}
    with torch.no_grad():
        for layer in layers:
            weight = _weight(layer)
            if weight.dim() != 2:
                continue  # not a linear map: PEFT does not rewrite it
            width = weight.shape[1]
            if width not in vectors:
                vectors[width] = torch.randn(width, generator=generator)
            products[id(layer)] = (layer, _times(weight, vectors[width]))
        vocabulary = model.get_input_embeddings().num_embeddings
        input_ids = torch.randint(0, vocabulary, (1, PROBE_TOKENS), generator=generator)
        logits = _probe_logits(model, input_ids)
    return BaseRecord(products, vectors, input_ids, logits)


def _probe_logits(model: Any, input_ids: Any) -> Any:
    """Logits in eval mode (no dropout) without gradients; the model's mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(input_ids=input_ids.to(model.device)).logits.float().cpu()
    finally:
        model.train(was_training)


def check_conserved(model: Any, recipe: Recipe, before: BaseRecord, layers: list[tuple[str, Any]]) -> None:
    """The init moved part of every adapted layer's weight into the adapter and nothing else: (a) the base weight
    changed, (b) W_res + s B0 A0 = W, checked on a random vector, and (c) the model's logits at step 0 are the
    original base's."""
    import torch

    init = recipe.init_lora_weights
    with torch.no_grad():
        for name, layer in layers:
            base = layer.get_base_layer()
            if id(base) not in before.products or before.products[id(base)][0] is not base:
                raise RuntimeError(
                    f"{name}: no record of its weight before the adapter (not a target when "
                    f"recorded), so init_lora_weights {init} cannot be checked there"
                )
            original = before.products[id(base)][1].to(base.weight.device)
            weight = _weight(base)
            v = before.vectors[weight.shape[1]]
            for adapter, scaling in layer.scaling.items():
                a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
                residual = _times(weight, v)
                adapter_part = scaling * (b @ (a @ v.to(a.device))).to(residual.device)
                scale = _times(weight.abs(), v.abs()) + scaling * (b.abs() @ (a.abs() @ v.abs().to(a.device))).to(
                    residual.device
                )
                tolerance = CONSERVED_TOLERANCE + torch.finfo(weight.dtype).eps / 2
                moved = (residual - original).abs().max().item()
                if moved <= MOVED_AT_LEAST * original.abs().max().item():
                    raise RuntimeError(
                        f"{name}: init_lora_weights {init} left the base weight unchanged (W v moved "
                        f"by {moved:.2g}): PEFT did not apply it"
                    )
                error = ((residual + adapter_part - original).abs() / scale.clamp_min(1e-30)).max().item()
                if error > tolerance:
                    raise RuntimeError(
                        f"{name}: W_res + s B0 A0 differs from the original weight by {error:.2g} of "
                        f"its scale (tolerance {tolerance:.2g}): init_lora_weights {init} did not "
                        "conserve the base"
                    )
    dtype = layers[0][1].get_base_layer().weight.dtype
    tolerance = LOGITS_TOLERANCE if dtype == torch.float32 else LOGITS_TOLERANCE_HALF
    logits = _probe_logits(model, before.input_ids)
    difference = ((logits - before.logits).norm() / before.logits.norm()).item()
    if difference > tolerance:
        raise RuntimeError(
            f"init_lora_weights {init}: the adapted model's step-0 logits differ from the original "
            f"base's by {difference:.2g} (RMS, relative; tolerance {tolerance:g} in {dtype}): it would "
            "not start at the base"
        )
    log.info(
        f"init_lora_weights {init}: checked on {len(layers)} layers: the base rewritten, W_res + s B0 A0 = W, "
        f"step-0 logits within {difference:.1g} (RMS, relative) of the original base's"
    )


# ---------------------------------------------------------------------------------------------- the initial adapter


def initial_adapter_dir(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / INITIAL_ADAPTER


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


def save_converted_adapter(trainer: Any, recipe: Recipe, directory: Path, checkpoint: str | None = None) -> None:
    """The trained adapter as a plain adapter of the original base (rank 2r), through PEFT's conversion against
    ``output_dir/initial_adapter``; ``checkpoint``: that checkpoint's adapter (loaded into the model first)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if checkpoint:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        # the fresh model holds A0, B0 on the residual base it was checked to share with the checkpoint
        result = set_peft_model_state_dict(model, load_file(str(Path(checkpoint) / ADAPTER_FILE)))
        missing = [key for key in result.missing_keys if ".lora_" in key]
        if missing:
            raise RuntimeError(f"{checkpoint}/{ADAPTER_FILE} lacks {len(missing)} adapter tensors (e.g. {missing[0]})")
    initial = initial_adapter_dir(recipe).resolve()
    if not (initial / "adapter_config.json").is_file():  # saved at step 0: someone removed it since
        raise RecipeError(
            f"{initial} is missing, so the trained {recipe.init_lora_weights} adapter cannot be "
            "converted to one of the original base: train again with --overwrite_output_dir true"
        )
    with warnings.catch_warnings():
        # PEFT loads the initial adapter beside the trained one to convert it, and warns to convert: this is that
        warnings.filterwarnings("ignore", message=".* changes the base weights of the model and should thus not")
        model.save_pretrained(
            str(directory), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
        )
