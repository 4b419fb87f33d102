"""The LoRA adapter on a loaded base, and the proofs at step 0 that PEFT built what the recipe asks: built with the
recipe's init (:mod:`hf_lora_recipe.inits`), whose hooks run at fixed points here."""

from __future__ import annotations

import weakref
from typing import Any

from hf_lora_recipe.inits import init_for
from hf_lora_recipe.model.architecture import with_projections
from hf_lora_recipe.model.loading import prepare_base, trainable_token_targets
from hf_lora_recipe.recipe.schema import Recipe, peft_target_modules


def lora_config(
    recipe: Recipe, trainable_tokens: list[int] | dict[str, list[int]] | None = None, initialised: bool = True
) -> Any:
    """The recipe's LoraConfig. Only the named projections get adapters: never embeddings, norms or the LM head,
    except the rows of ``trainable_tokens`` (see :func:`trainable_token_targets`). ``initialised`` False: the
    shapes only (counting on the meta device), without the init, which may need weights or data.

    PEFT refuses dropout on parameter targets (x cannot be factored out of W x there): with
    ``lora_target_parameters`` the config says 0 and :func:`add_adapter` puts the recipe's dropout on the module
    targets only."""
    from peft import LoraConfig

    return LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0 if recipe.lora_target_parameters else recipe.lora_dropout,
        target_modules=peft_target_modules(recipe),
        target_parameters=list(recipe.lora_target_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
        use_rslora=recipe.use_rslora,
        use_dora=recipe.use_dora,
        **(init_for(recipe).peft_kwargs(recipe) if initialised else {"init_lora_weights": False}),
    )


_BEFORE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapted model -> its init's before_adapter result


def check_variants(model: Any, recipe: Recipe, before: Any | None = None) -> None:
    """Prove the recipe's LoRA variant is the one PEFT built, layer by layer, before any step: a config that
    accepted a variant and silently trained plain LoRA stops the run here.

    The scaling and DoRA here; then the init's own proof (:meth:`LoraInit.verify`) against ``before``, by default
    what its ``before_adapter`` returned in :func:`add_adapter`. An init finished after the trainer is built (EVA)
    is checked then.
    """
    import math

    from peft.tuners.lora import LoraLayer

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
    init_for(recipe).verify(model, recipe, layers, before if before is not None else _BEFORE.get(model))


def add_adapter(model: Any, recipe: Recipe, token_ids: list[int] | None = None, data: Any = None) -> Any:
    """Attach LoRA to a prepared base (see :func:`prepare_base`), training the rows of ``token_ids`` too (the
    chat template's special tokens, when ``train_template_tokens``); ``data``: the tokenized training set, for an
    init that reads it before the adapter exists."""
    from peft import get_peft_model

    recipe = with_projections(recipe, model)  # the seed's intent, when not resolved already (train resolves it)
    init = init_for(recipe)
    model = prepare_base(model, recipe)
    config = lora_config(recipe, trainable_token_targets(model, token_ids) if token_ids else None)
    before = init.before_adapter(model, recipe, config, data)
    model = get_peft_model(model, config)
    if recipe.lora_target_parameters and recipe.lora_dropout:
        dropout_on_modules(model, recipe.lora_dropout)
    if before is not None:
        _BEFORE[model] = before  # for check_variants
    if not init.final_after_trainer:
        finish_adapter(model, recipe)
    return model


def dropout_on_modules(model: Any, probability: float) -> None:
    """The recipe's dropout on every module-targeted adapter (parameter-targeted ones take none)."""
    import torch
    from peft.tuners.lora import LoraLayer, ParamWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Dropout(p=probability)


def finish_adapter(model: Any, recipe: Recipe) -> None:
    """The adapter's dtype and compilation, once its layers (and their ranks) are final."""
    import torch

    from hf_lora_recipe.distributed.engines import adapter_bytes_per_parameter, current_engine

    if adapter_bytes_per_parameter(recipe, current_engine().plan_strategy) == 2:
        # bf16 adapter weights (on a 4-bit base computing in 16 bits, as TRL would make them anyway; under
        # DeepSpeed with bf16, which runs the module in bf16): PEFT's default is fp32. DoRA's magnitudes stay fp32:
        # their updates are below bf16's resolution.
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    if recipe.compile:  # after PEFT, so LoRA and its dropout are inside each compiled layer
        from hf_lora_recipe.model.compile_layers import compile_decoder_layers

        compile_decoder_layers(model)
