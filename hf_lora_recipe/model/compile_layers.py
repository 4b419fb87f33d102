"""``torch.compile`` one decoder layer at a time (the recipe's ``compile`` knob).

Per layer, not the whole model:

* Small graphs. A decoder layer is one attention block and one MLP; the embedding, the LM head and the loss
  stay eager, so a compile error or a graph break is confined to one layer and the loss code is free to change.
* bitsandbytes and PEFT stay inside. The layer's graph holds PEFT's LoRA wrappers (A, B, scaling and the
  adapter's dropout) around the base projections, bitsandbytes' 4-bit ``Linear4bit`` included, so they fuse
  with the norms, rotary embedding and activations around them.
* One graph for all layers. Every layer runs the same code on inputs of the same shapes, and dynamo guards on
  that rather than on the layer object, so all layers share the graph compiled for the first one: compile
  time does not grow with depth. (A second graph appears only when layer 0's input does not require grad
  while the others' do, i.e. without checkpointing's ``enable_input_require_grads``.)
* Checkpointing stays correct and inside. ``Module.compile`` compiles the module's ``__call__``, which in
  transformers runs ``GradientCheckpointingLayer``'s wrapper, so the non-reentrant checkpoint is traced into
  the graph and AOTAutograd recomputes the layer in the backward, saving each dropout's RNG state for the
  replay.
"""

from __future__ import annotations

from typing import Any

from hf_lora_recipe.model.architecture import decoder_layers
from hf_lora_recipe.recipe.schema import RecipeError
from hf_lora_recipe.upstream import torch as torch_upstream


# Dropout draws from the eager generator, not from inductor's own random kernels:
# * Under checkpointing the backward must differentiate the mask the forward applied. With inductor's RNG the
#   forward and its recomputation are different kernels, and since PyTorch 2.13 they disagree on CUDA when the
#   dropout reads a materialised reshape, as o_proj's adapter reads attention's `transpose(1, 2).contiguous()`:
#   the 1-D forward kernel takes the 4x Philox path (`rand4x`), which also repeats the mask across groups of 4
#   channels, the tiled recompute does not, so the gradients are silently wrong (pytorch/pytorch#198333, open;
#   the CPU's C++ kernels are not affected). With eager RNG the partitioner saves the generator state in the
#   forward and replays the same eager dropout from it in the backward, as eager checkpointing does.
# * Compiled masks are then eager's masks for the same seed: compile changes the speed, not the run.
# The cost is an unfused dropout kernel per adapter, what eager LoRA pays anyway. Passed per compile, not set
# globally, so other compiled code in the process keeps inductor's defaults.
INDUCTOR_OPTIONS = {"fallback_random": True}


def compile_decoder_layers(model: Any) -> int:
    """Compile each decoder layer in place; returns how many were compiled.

    Shapes are dynamic from the first step: packed or padding-free batches change length every step, and
    with static shapes dynamo compiles once per length until its recompile limit (8), after which every
    further length runs eagerly. With ``dynamic=None`` it compiles a static graph for the first length and a
    dynamic one at the second; ``dynamic=True`` compiles the dynamic graph once.

    ``fullgraph=True``: a layer dynamo cannot trace whole raises instead of running partly or wholly eager, and
    :func:`check_compiled` later proves every layer went through its compiled call.
    """
    import torch

    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        compiled = torch.compile(
            torch_upstream.module_call(layer), dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS
        )
        torch_upstream.set_compiled_call(layer, CountedCall(index, compiled))
    return len(layers)


class CountedCall:
    """A decoder layer's compiled call that counts its calls and turns a compile failure into one line."""

    def __init__(self, index: int, compiled: Any):
        self.index, self.compiled, self.calls = index, compiled, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        try:
            with torch_upstream.checkpoint_side_effects_allowed():
                return self.compiled(*args, **kwargs)
        except torch_upstream.COMPILE_ERRORS as error:
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise RecipeError(
                f"compile: decoder layer {self.index} cannot be compiled as one graph "
                f"({reason[:160]}; transformers {_transformers_version()}); set compile false"
            ) from None


def check_compiled(model: Any) -> str:
    """After the first optimizer step: every decoder layer ran through its compiled call and dynamo compiled a
    graph, or the run stops. Returns the line to log."""
    layers = decoder_layers(model)
    calls = [getattr(torch_upstream.compiled_call(layer), "calls", 0) for layer in layers]
    eager = [index for index, count in enumerate(calls) if count == 0]
    if eager or torch_upstream.graphs_compiled() == 0:
        what = (
            f"decoder layers {eager[:8]} never ran their compiled call"
            if eager
            else "dynamo compiled no graph (is TORCHDYNAMO_DISABLE set?)"
        )
        raise RecipeError(
            f"compile: true was asked, but after step 1 {what} (transformers "
            f"{_transformers_version()}); set compile false or report this"
        )
    return f"compile: all {len(layers)} decoder layers ran compiled in step 1"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
