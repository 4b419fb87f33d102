"""Where a causal LM keeps its decoder layers and its projections, read off the model itself (on the meta device),
so the seed's target intent, "every attention and MLP projection", means the same thing on every family:

* separate projections (Llama, Mistral, Qwen2/3, Gemma 2/3, OLMo 2): q, k, v, o, gate, up, down;
* fused ones (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's query_key_value and dense_*): the fused names;
* MoE experts stored as 3-D parameters (Qwen3-MoE, Mixtral, gpt-oss in transformers 5): PEFT's
  ``target_parameters``, since they are not ``nn.Linear``; the router stays frozen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_lora_recipe.recipe.schema import ALL_PROJECTIONS, AUTO, Recipe, RecipeError


# MoE routers and shared-expert gates: adapting them changes which experts run, not what they compute, so the
# seed leaves them frozen (transformers names them so in Mixtral, Qwen-MoE, gpt-oss, OLMoE, DeepSeek)
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


def decoder_layers(model: Any) -> Any:
    """The decoder layers (an ``nn.ModuleList``) of a PEFT-wrapped or plain transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "model") or "model"
    inner = getattr(base, prefix, None)
    layers = getattr(inner, "layers", None)
    if layers is None:  # a multimodal wrapper's text decoder
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if layers is None:
        raise RecipeError(
            f"{type(base).__name__} has no decoder layers at .{prefix}.layers: is it a decoder-only causal LM "
            "transformers builds?"
        )
    return layers


@dataclass(frozen=True)
class Projections:
    """The seed's targets on one architecture: module names (as PEFT's ``target_modules``) and 3-D parameters
    (as its ``target_parameters``), in the order a decoder layer holds them."""

    modules: list[str]
    parameters: list[str]

    def line(self, architecture: str) -> str:
        experts = f"; experts as parameters: {', '.join(self.parameters)}" if self.parameters else ""
        return f"{architecture}: every attention and MLP projection is {', '.join(self.modules)}{experts}"


def projections(model: Any) -> Projections:
    """Every linear layer of the decoder layers but routers, by its name's last part; every 3-D parameter of an
    experts module, by its name inside the layer."""
    import torch
    from transformers.pytorch_utils import Conv1D

    modules: dict[str, None] = {}
    parameters: dict[str, None] = {}
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, (torch.nn.Linear, Conv1D)) and leaf not in ROUTER_NAMES:
                modules[leaf] = None
        for name, parameter in layer.named_parameters():
            if parameter.dim() == 3 and "experts" in name.split("."):
                parameters[name] = None
    if not modules and not parameters:
        raise RecipeError(
            f"lora_target_modules: {type(model).__name__}'s decoder layers hold no linear projection; name the "
            "modules to adapt with --lora_target_modules"
        )
    return Projections(list(modules), list(parameters))


def with_supported_attention(recipe: Recipe, model: Any) -> Recipe:
    """``recipe`` with sdpa (or auto, which picks from sdpa's family) replaced by eager where the architecture
    has no sdpa path (transformers refuses it there: Gemma 2's softcapping, gpt-oss's attention sinks); other
    kernels are the user's explicit choice."""
    from hf_lora_recipe.upstream.transformers import supports_sdpa

    if recipe.attn_implementation not in ("sdpa", AUTO) or supports_sdpa(model):
        return recipe
    return dataclasses.replace(recipe, attn_implementation="eager")


def with_projections(recipe: Recipe, model: Any) -> Recipe:
    """``recipe`` with the seed's intent (``lora_target_modules: all-projections``) replaced by what it means on
    ``model``'s architecture; a recipe naming its targets is returned as it is. Parameters the recipe names
    itself are kept."""
    if recipe.lora_target_modules != [ALL_PROJECTIONS]:
        return recipe
    found = projections(model)
    return dataclasses.replace(
        recipe,
        lora_target_modules=found.modules,
        lora_target_parameters=recipe.lora_target_parameters or found.parameters,
    )
