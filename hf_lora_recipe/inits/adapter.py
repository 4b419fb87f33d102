"""The LoRA adapter on a loaded base, and the proofs at step 0 that PEFT built what the recipe asks.

Kept with the inits because each initialisation adds its own step: EVA's config and its later finish, PiSSA/OLoRA's
record of the base before it is rewritten, the orthogonal and zero-B checks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.model.loading import check_targets, prepare_base, resolve_targets, trainable_token_targets
from hf_lora_recipe.recipe.schema import Recipe, peft_target_modules


def lora_config(recipe: Recipe, trainable_tokens: list[int] | dict[str, list[int]] | None = None) -> Any:
    """The recipe's LoraConfig. Only the named projections get adapters: never embeddings, norms or the LM head,
    except the rows of ``trainable_tokens`` (see :func:`trainable_token_targets`)."""
    from peft import LoraConfig

    from hf_lora_recipe.inits.eva import eva_config

    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=peft_target_modules(recipe),
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
        use_rslora=recipe.use_rslora,
        use_dora=recipe.use_dora,
        init_lora_weights=peft_init_lora_weights(recipe.init_lora_weights),
        eva_config=eva_config(recipe),
    )


def peft_init_lora_weights(value: str) -> bool | str:
    """The recipe's ``init_lora_weights`` as LoraConfig takes it (``true`` is PEFT's boolean default)."""
    return True if value == "true" else value


@dataclass
class BaseRecord:
    """What the base computed before a base-rewriting initialisation (PiSSA, OLoRA) touched it, without copying a
    weight: each adapted layer's W v (fp32) for one fixed random v per input width, and the logits on a probe."""

    products: dict[int, tuple[Any, Any]]  # id(layer) -> (the layer, which PEFT keeps as base_layer; W v)
    vectors: dict[int, Any]  # input width -> v (CPU, fp32)
    input_ids: Any
    logits: Any  # fp32, eval mode, no grad


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapted model -> its BaseRecord (add_adapter)

PROBE_TOKENS = 16

# (a) an untouched base moves W v by exactly 0; PiSSA/OLoRA move it by 17-19% of max |W v| on SmolLM2-135M.
MOVED_AT_LEAST = 1e-3

# (b) |(W_res + s B0 A0 - W) v| against |W_res| |v| + s |B0| |A0| |v|, row by row: the residual is rounded to the
# base's dtype (at most its unit roundoff, eps/2), the products summed in fp32 (1e-4 covers 14336-long rows).
# Measured: 8e-8 in fp32, 4e-4 in bf16; an initialisation that does not conserve the base is off by O(1).
CONSERVED_TOLERANCE = 1e-4

# (c) the step-0 logits' RMS difference against the original's RMS. fp32 agrees to ~3e-6; in bf16 the layers
# round differently once the principal part runs through the adapter: 2% on SmolLM2-135M (PiSSA and OLoRA),
# where a wrongly rewritten base is off by 130-160%. (b) is the exact check, (c) the end-to-end one.
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
                continue  # not a linear map: PEFT does not rewrite it (check_variants says so if it was adapted)
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


def check_variants(model: Any, recipe: Recipe, before: BaseRecord | None = None) -> None:
    """Prove the recipe's LoRA variant is the one PEFT built, layer by layer, before any step: a config that
    accepted a variant and silently trained plain LoRA stops the run here.

    PiSSA/OLoRA (see :func:`check_conserved`) against ``before``, by default what :func:`add_adapter` recorded;
    every other initialisation starts with B = 0. EVA (see :func:`hf_lora_recipe.inits.eva.check_eva`) only after its
    data pass has set A and the ranks.
    """
    import math

    from peft.tuners.lora import LoraLayer

    from hf_lora_recipe.inits.eva import check_eva, uses_eva
    from hf_lora_recipe.inits.pissa_olora import rewrites_base

    # EVA scales each layer's alpha with its rank, which keeps alpha/r (rsLoRA is refused with it)
    expected_scaling = recipe.lora_alpha / (math.sqrt(recipe.lora_r) if recipe.use_rslora else recipe.lora_r)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not layers:
        raise RuntimeError("no LoRA layer in the model: the adapter was not applied")
    for name, layer in layers:
        for adapter, scaling in layer.scaling.items():
            if not math.isclose(scaling, expected_scaling, rel_tol=1e-6):
                raise RuntimeError(
                    f"{name}: LoRA scaling {scaling:g}, but use_rslora {recipe.use_rslora} with "
                    f"alpha {recipe.lora_alpha} and r {recipe.lora_r} means {expected_scaling:g}"
                )
            magnitude = adapter in getattr(layer, "lora_magnitude_vector", {})
            if magnitude != recipe.use_dora or (
                magnitude and not all(p.requires_grad for p in layer.lora_magnitude_vector[adapter].parameters())
            ):
                raise RuntimeError(
                    f"{name}: use_dora {recipe.use_dora}, but the layer "
                    f"{'has a' if magnitude else 'has no'} trainable DoRA magnitude vector"
                )
            if recipe.init_lora_weights == "orthogonal":
                check_product_is_zero(
                    name,
                    layer.lora_A[adapter].weight,
                    layer.lora_B[adapter].weight,
                    layer.get_base_layer().weight.dtype,
                )
            elif not rewrites_base(recipe) and layer.lora_B[adapter].weight.abs().max() != 0:
                raise RuntimeError(
                    f"{name}: lora_B is not zero at step 0 (init_lora_weights "
                    f"{recipe.init_lora_weights}): the adapted model would not start at the base"
                )
    if rewrites_base(recipe):
        before = before if before is not None else _RECORDS.get(model)
        if before is None:
            raise RuntimeError(
                f"init_lora_weights {recipe.init_lora_weights}: no record of the base before the "
                "adapter rewrote it (build the model with add_adapter), so it cannot be checked"
            )
        check_conserved(model, recipe, before, layers)
    if uses_eva(recipe):  # EVA's rank budget is r for every module the recipe adapts
        check_eva(model, recipe, layers, sum(len(names) for names in check_targets(recipe).values()))


# |B A| against |B| |A|, largest entry: fp32 factors leave ~1e-7 (measured 2.7e-8 on the tiny model). PEFT rounds
# A and B to the base's dtype before they become fp32 again, so on a bf16 base B A is only zero to bf16 rounding
# (measured 1.5e-3): the tolerance is then that dtype's epsilon, an initialisation with B A != 0 is off by O(1).
ORTHOGONAL_TOLERANCE = 1e-5


def check_product_is_zero(name: str, lora_a: Any, lora_b: Any, base_dtype: Any) -> None:
    """Orthogonal init: B and A are both non-zero (that is its point) yet B A = 0, so step 0 is the base (to the
    rounding of the base's dtype)."""
    import torch

    tolerance = ORTHOGONAL_TOLERANCE if base_dtype == torch.float32 else torch.finfo(base_dtype).eps
    with torch.no_grad():
        a, b = lora_a.float(), lora_b.float()
        product = (b @ a).abs().max().item()
        scale = (b.abs() @ a.abs()).max().item()
    if b.abs().max() == 0 or product > tolerance * scale:
        raise RuntimeError(
            f"{name}: init_lora_weights orthogonal should give non-zero A and B with B A = 0; got "
            f"|B| max {b.abs().max().item():.2g}, |B A| {product:.2g} of {scale:.2g}: it would not "
            "start at the base, or PEFT did not apply it"
        )


def check_conserved(model: Any, recipe: Recipe, before: BaseRecord, layers: list[tuple[str, Any]]) -> None:
    """PiSSA/OLoRA moved part of every adapted layer's weight into the adapter and nothing else: (a) the base
    weight changed, (b) W_res + s B0 A0 = W, checked on a random vector, and (c) the model's logits at step 0
    are the original base's."""
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


def add_adapter(model: Any, recipe: Recipe, token_ids: list[int] | None = None) -> Any:
    """Attach LoRA to a prepared base (see :func:`prepare_base`), training the rows of ``token_ids`` too (the
    chat template's special tokens, when ``train_template_tokens``)."""
    import torch
    from peft import get_peft_model

    from hf_lora_recipe.distributed.engines import current_engine
    from hf_lora_recipe.inits.eva import uses_eva
    from hf_lora_recipe.inits.pissa_olora import rewrites_base

    model = prepare_base(model, recipe)
    tokens = trainable_token_targets(model, token_ids) if token_ids else None
    record = None
    if rewrites_base(recipe):
        if torch.cuda.is_available() and not current_engine().shards_weights:
            # PiSSA's SVD / OLoRA's QR of every target weight: minutes on the GPU the trainer moves the model to
            # anyway, hours on the CPU for an 8B base
            model.to(torch.device("cuda", log.local_rank()))
        record = record_base(model, recipe)
    model = get_peft_model(model, lora_config(recipe, tokens))
    if record is not None:
        _RECORDS[model] = record  # for check_variants: W_res + s B0 A0 = W and the step-0 logits
    if not uses_eva(recipe):  # EVA replaces A (and the ranks) after its data pass, and finishes the adapter then
        finish_adapter(model, recipe)
    return model


def finish_adapter(model: Any, recipe: Recipe) -> None:
    """The adapter's dtype and compilation, once its layers (and their ranks) are final."""
    import torch

    from hf_lora_recipe.distributed.engines import adapter_bytes_per_parameter, current_engine

    if adapter_bytes_per_parameter(recipe, current_engine().plan_strategy) == 2:
        # bf16 adapter weights (on a 4-bit base, as TRL would make them anyway; under DeepSpeed with bf16, which
        # runs the module in bf16): PEFT's default is fp32. DoRA's magnitudes stay fp32: their updates are below
        # bf16's resolution.
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    if recipe.compile:  # after PEFT, so LoRA and its dropout are inside each compiled layer
        from hf_lora_recipe.model.compile_layers import compile_decoder_layers

        compile_decoder_layers(model)
