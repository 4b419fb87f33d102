"""The formulas behind `plan` and `per_device_train_batch_size: auto`: a model's shape read off the meta device,
memory per GPU by component, FLOPs per token. No weights are read; every constant says where it comes from.
How close they come to measured peaks is in docs/plan.md (activations are checked tensor by tensor in
tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from hf_lora_recipe.distributed.engines import adapter_bytes_per_parameter
from hf_lora_recipe.recipe.schema import ALL_LINEAR, Recipe, RecipeError, peft_target_modules


GIB = 1024**3

# name -> (memory GiB, dense bf16 peak TFLOP/s without sparsity, bf16 support)
GPUS: dict[str, tuple[float, float]] = {
    "A100-40": (40, 312.0),
    "A100-80": (80, 312.0),
    "H100": (80, 989.4),
    "H200": (141, 989.4),
    "L4": (24, 121.0),
    "A10G": (24, 125.0),
    "RTX3090": (24, 71.0),
    "RTX4090": (24, 165.2),
    "24GB": (24, 165.2),
}
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS workspace and allocator slack: a stated allowance
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes 4-bit block sizes (weights, then the double-quantized absmax)
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 8192  # TRL's fused LM head works on tiles, never the full logits
MASK_BYTES = 1  # dropout keeps a bool mask per element it drops from
PLAIN_LOSS_BYTES_PER_LOGIT = 12
DENSE_MASK_EXAMPLES_PER_ROW = 4


@dataclass(frozen=True)
class AdapterDims:
    """What one adapted type's parameter count is made of: r x (in + out) per expert, per module."""

    in_features: int
    out_features: int
    experts: int
    modules: int

    def line(self, r: int) -> str:
        experts = f" x {self.experts} experts" if self.experts > 1 else ""
        return f"r {r} x ({self.in_features} in + {self.out_features} out){experts} x {self.modules} modules"


def adapter_counts(peft_model: Any) -> dict[str, tuple[int, AdapterDims]]:
    """Adapter parameters per adapted type (a module's last name, or ``experts.<parameter>`` for a parameter
    target), with the dimensions they come from."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    counts: dict[str, tuple[int, AdapterDims]] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        leaf = name.replace(".base_layer", "").rsplit(".", 1)[-1]
        key = f"{leaf}.{module.parameter_name}" if isinstance(module, ParamWrapper) else leaf
        own = sum(
            p.numel()
            for part in (module.lora_A, module.lora_B, module.lora_magnitude_vector)
            for p in part.parameters()
            if p.requires_grad
        )
        count, dims = counts.get(key, (0, None))
        counts[key] = (
            count + own,
            AdapterDims(
                module.in_features,
                module.out_features,
                getattr(module, "num_experts", 1),
                (dims.modules if dims else 0) + 1,
            ),
        )
    return counts


@dataclass
class Shape:
    """What the memory and FLOPs formulas need, read off the meta-device model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int
    vocab: int
    quantizable: int  # nn.Linear weights inside the decoder layers: what bitsandbytes quantizes
    quantizable_tensors: list[int]  # numel of each, for the exact NF4 block count
    unquantized: int  # embeddings, LM head, norms, biases: left in 16/32-bit
    largest_layer: int  # params of one decoder layer (FSDP gathers one at a time)
    lora_inputs_per_layer: int  # sum of in_features over adapted modules of one layer
    lora_modules_per_layer: int
    rank_limits: dict[str, int] = field(default_factory=dict)  # adapted module type -> min(in, out): r's ceiling
    lora_by_module: dict[str, int] = field(default_factory=dict)  # adapted type -> its adapter parameters
    lora_dims: dict[str, AdapterDims] = field(default_factory=dict)  # and why: r x (in + out) x experts x modules
    target_modules: list[str] = field(default_factory=list)  # as resolved for this architecture
    target_parameters: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    unmatched_targets: list[str] = field(default_factory=list)


def attention_widths(text: Any) -> tuple[int, int]:
    """(query heads, key/value width = kv heads x head dim) of a text config; configs without grouped-query
    attention or an explicit head_dim have as many kv heads as heads and hidden / heads per head."""
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, (getattr(text, "num_key_value_heads", None) or heads) * head_dim


def measure_shape(config: Any, recipe: Recipe, model: Any | None = None) -> Shape:
    """Count the base and its adapter on the meta device, module by module. ``model``: the base already built
    there from ``config`` (see :class:`BaseOnMeta`); it receives the adapter, so it serves one count only."""
    import torch
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.architecture import decoder_layers, with_projections
    from hf_lora_recipe.model.loading import meta_model

    model = meta_model(config, recipe) if model is None else model
    recipe = with_projections(recipe, model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    all_linear = recipe.lora_target_modules == [ALL_LINEAR]
    unmatched = [] if all_linear else [t for t in recipe.lora_target_modules if t not in names]
    layers = decoder_layers(model)
    quantizable = [m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    total_base = sum(p.numel() for p in model.parameters())
    text = config.get_text_config()
    heads, kv_dim = attention_widths(text)
    adapted = [
        (name.rsplit(".", 1)[-1], module.in_features, module.out_features)
        for name, module in layers[0].named_modules()
        if isinstance(module, torch.nn.Linear)
        and (all_linear or name.rsplit(".", 1)[-1] in recipe.lora_target_modules)
    ]
    shape = Shape(
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads,
        kv_dim=kv_dim,
        vocab=text.vocab_size,
        quantizable=sum(quantizable),
        quantizable_tensors=quantizable,
        unquantized=total_base - sum(quantizable),
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        lora_inputs_per_layer=sum(in_features for _, in_features, _ in adapted),
        lora_modules_per_layer=len(adapted),
        rank_limits={name: min(in_features, out_features) for name, in_features, out_features in adapted},
        target_modules=list(recipe.lora_target_modules),
        target_parameters=list(recipe.lora_target_parameters),
        unmatched_targets=unmatched,
    )
    if unmatched:
        return shape
    with init_empty_weights():
        peft_model = get_peft_model(model, lora_config(recipe, initialised=False))
    for key, (count, dims) in adapter_counts(peft_model).items():
        shape.lora_by_module[key] = count
        shape.lora_dims[key] = dims
    shape.trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape.total = total_base + shape.trainable
    return shape


def rank_over_limits(recipe: Recipe, shape: Shape) -> dict[str, int]:
    """The adapted module types whose min(in, out) is below ``lora_r``: B A there has rank min(in, out) at most,
    so the extra rank only adds parameters and memory (every type: the recipe is refused)."""
    return {name: limit for name, limit in shape.rank_limits.items() if recipe.lora_r > limit}


def check_rank_fits(recipe: Recipe, shape: Shape) -> None:
    over = rank_over_limits(recipe, shape)
    if over and len(over) == len(shape.rank_limits):
        raise RecipeError(
            f"lora_r {recipe.lora_r} exceeds every target's min(in, out) "
            f"({', '.join(f'{name} {limit}' for name, limit in over.items())}); set lora_r to at most "
            f"{max(over.values())}"
        )


class BaseOnMeta:
    """One run's base, built once on the meta device from its config.json and handed to whoever needs it: the
    LoRA targets it resolves to (refusing a name that matches nothing) and, after them, its counted shape."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    def resolved_recipe(self) -> Recipe:
        """The recipe with the seed's target intent resolved on this base (model/architecture.py), which the
        targets and the shape then use; logged with the names it resolved to."""
        from hf_lora_recipe import log
        from hf_lora_recipe.model.architecture import Projections, with_projections, with_supported_attention

        model = self._built[1]
        resolved = with_projections(self.recipe, model)
        if resolved is not self.recipe:
            used = Projections(resolved.lora_target_modules, resolved.lora_target_parameters)
            log.info(used.line(type(model).__name__))
        attention = with_supported_attention(resolved, model)
        if attention is not resolved:
            log.info(
                f"attn_implementation {resolved.attn_implementation} -> eager: transformers has no sdpa path for "
                f"{type(model).__name__}"
            )
        self.recipe = attention
        return attention

    @functools.cached_property
    def _built(self) -> tuple[Any, Any]:
        from hf_lora_recipe.model.loading import meta_model, model_config

        config = model_config(self.recipe)
        return config, meta_model(config, self.recipe)

    @functools.cached_property
    def targets(self) -> dict[str, list[str]]:
        from hf_lora_recipe.model.loading import resolve_parameters, resolve_targets

        model = self._built[1]
        targets = resolve_targets(model, peft_target_modules(self.recipe))
        return {**targets, **resolve_parameters(model, self.recipe.lora_target_parameters)}

    @functools.cached_property
    def shape(self) -> Shape:
        _ = self.targets  # resolved first: counting wraps the model in its adapter
        config, model = self._built
        return measure_shape(config, self.recipe, model)


# ---------------------------------------------------------------- memory


def nf4_packed_bytes(numels: list[int]) -> int:
    """The packed 4-bit weights alone: two per byte (what FSDP shards; the constants stay whole)."""
    return sum(math.ceil(n / 2) for n in numels)


def nf4_bytes(numels: list[int], double_quant: bool) -> int:
    """Packed 4-bit weights plus their quantization constants, as bitsandbytes allocates them."""
    total = nf4_packed_bytes(numels)
    for n in numels:
        blocks = math.ceil(n / NF4_BLOCK)
        total += 4 * 16  # the 16-value NF4 code table each module keeps
        if double_quant:  # absmax as uint8, re-quantized in blocks of 256: fp32 constants, offset, 256-entry code
            total += blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * 256
        else:
            total += 4 * blocks
    return total


def activation_bytes_per_token(shape: Shape, recipe: Recipe, fp32_residual: bool) -> tuple[float, float]:
    """(saved per decoder layer, saved by the final norm) bytes per token, for a Llama-style layer under the recipe's precision.

    Counted tensor by tensor from what autograd keeps for backward (matches saved-tensor measurements of
    tiny models on CPU within a few percent; tests/test_plan.py): RMSNorm keeps its fp32 input and output,
    each projection its input (bitsandbytes casts separately per module; dense bf16 projections share
    one cast), LoRA (below), RoPE its rotated halves,
    SDPA q/k/v/out and the log-sum-exp, SwiGLU gate, up and activation.
    """
    h, kv, inter, r = shape.hidden, shape.kv_dim, shape.intermediate, recipe.lora_r
    act = 2 if recipe.bf16 else 4
    norm = (8 * h + 4) if fp32_residual else (6 * h + 4)
    if recipe.load_in_4bit:
        projection_inputs = act * (3 * h + h + 2 * h + inter)
    else:
        projection_inputs = act * (h + h + h + inter)
    lora_inputs = shape.lora_inputs_per_layer
    dropout_mask = MASK_BYTES * lora_inputs if recipe.lora_dropout > 0 else 0
    # PEFT casts each module's input to the adapter's dtype: under bf16 compute an fp32 adapter's A matmul keeps
    # autocast's bf16 copy of it, 2 bytes per input that a bf16 adapter (QLoRA, as TRL trains it) does not
    # (measured per module on CPU: fp32 minus bf16 adapter = 2 bytes per input, with and without dropout)
    wider_adapter = 2 * lora_inputs if adapter_bytes_per_parameter(recipe) > act else 0
    lora = dropout_mask + wider_adapter + act * r * shape.lora_modules_per_layer
    rotary = 2 * act * (h + kv)
    attention = act * (2 * h + 2 * kv) + 4 * shape.heads
    mlp = 3 * act * inter
    # DoRA keeps two output-sized tensors per adapted module (the base output and its rescaled form)
    dora = 2 * act * lora_outputs_per_layer(shape, recipe) if recipe.use_dora else 0
    final_norm = 4 * h + 4  # its frozen weight needs no saved input: the fp32 input and the rsqrt
    return 2 * norm + projection_inputs + lora + dora + rotary + attention + mlp, final_norm


@dataclass
class Memory:
    """Bytes per GPU, by component."""

    quantized_weights: int
    unquantized_weights: int
    adapter: int
    gradients: int
    optimizer: int
    gathered_layers: int  # sharded strategies: the layer being computed and the one prefetched, whole
    activations: int
    loss_buffers: int
    cuda_context: int

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


def memory(shape: Shape, recipe: Recipe, micro_batch: int, num_gpus: int = 1, strategy: str = "ddp") -> Memory:
    """Peak memory per GPU at ``micro_batch`` x ``max_length`` tokens; strategy ddp, fsdp, zero2 or zero3 (ZeRO-2
    holds what DDP holds, in DeepSpeed's dtypes; its optimizer partitions live in flat buffers plan does not count)."""
    tokens = micro_batch * recipe.max_length
    dense_bytes = 2 if recipe.bf16 else 4
    sharded = strategy in ("fsdp", "zero3") and num_gpus > 1
    # One process per GPU: PEFT's k-bit preparation upcasts embeddings, LM head and norms to fp32, and the
    # residual stream follows. Sharded QLoRA keeps every unquantized tensor in bf16, one dtype to flatten.
    fp32_residual = (recipe.load_in_4bit and not sharded and recipe.kbit_upcast_fp32) or not recipe.bf16
    if recipe.load_in_4bit:
        quantized = nf4_bytes(shape.quantizable_tensors, recipe.use_bnb_nested_quant)
        unquantized = (4 if fp32_residual else 2) * shape.unquantized
    else:
        quantized = 0
        unquantized = dense_bytes * (shape.quantizable + shape.unquantized)
    adapter_bytes = adapter_bytes_per_parameter(recipe, strategy)
    adapter = adapter_bytes * shape.trainable
    gradients = adapter_bytes * shape.trainable  # a gradient has its parameter's dtype
    optimizer = 2 * adapter_bytes * shape.trainable  # AdamW's exp_avg and exp_avg_sq, in the parameter's dtype
    steps = 4 * 2 * shape.lora_modules_per_layer * shape.layers  # and a step count per tensor (A and B): fp32 scalars
    per_layer, final_norm = activation_bytes_per_token(shape, recipe, fp32_residual)
    residual = 4 if fp32_residual else 2
    dora_weights = dora_weight_bytes(shape, recipe)
    if recipe.gradient_checkpointing:
        # layer inputs kept for every layer, plus one layer recomputed in full during its backward
        activations = tokens * (shape.layers * shape.hidden * residual + final_norm + per_layer) + dora_weights
    else:
        activations = tokens * (shape.layers * per_layer + final_norm) + shape.layers * dora_weights
    if recipe.lm_head_loss == "plain":
        # full logits: bf16 output, fp32 upcast for the loss, fp32 and bf16 gradients (~12 bytes, measured on an H200)
        loss_buffers = tokens * shape.vocab * PLAIN_LOSS_BYTES_PER_LOGIT
    else:
        tile = min(tokens, TRL_TILE_TOKENS) * min(shape.vocab, TRL_TILE_VOCAB) * 4
        loss_buffers = 2 * tile + tokens * 4 * 4  # forward and backward tiles, per-token log-prob/entropy stats
    gathered = 0
    if sharded:
        layer_bytes = (
            nf4_bytes([shape.largest_layer], recipe.use_bnb_nested_quant)
            if recipe.load_in_4bit
            else shape.largest_layer * dense_bytes
        )
        gathered = 2 * layer_bytes
        if recipe.load_in_4bit:  # the packed weights are sharded; their quantization constants are not
            packed = nf4_packed_bytes(shape.quantizable_tensors)
            quantized = packed // num_gpus + (quantized - packed)
        unquantized = unquantized // num_gpus
        adapter, gradients, optimizer = adapter // num_gpus, gradients // num_gpus, optimizer // num_gpus
    return Memory(
        quantized,
        unquantized,
        adapter,
        gradients,
        optimizer + steps,
        gathered,
        int(activations),
        int(loss_buffers),
        int(CUDA_CONTEXT_GIB * GIB),
    )


def dora_weight_bytes(shape: Shape, recipe: Recipe) -> int:
    """What DoRA keeps per decoder layer whatever the tokens: for each adapted module, two weight-sized tensors
    (the dequantized W and W + s B A, for the norm it rescales by); bounded by every weight of the layer."""
    return 2 * (2 if recipe.bf16 else 4) * shape.largest_layer if recipe.use_dora else 0


def dense_mask_over_packed_rows(recipe: Recipe, on_gpu: bool | None = None) -> bool:
    """Padding-free rows under sdpa/eager attention, which build a row-length-squared mask and attend across the
    whole row; ``on_gpu``: for the machine the plan is for (default: this one)."""
    from hf_lora_recipe.model.loading import VARLEN_ATTENTION, attention_for, padding_free

    return padding_free(recipe, on_gpu) and attention_for(recipe, on_gpu) not in VARLEN_ATTENTION


def largest_fitting_micro_batch(
    shape: Shape, recipe: Recipe, limit_bytes: float, num_gpus: int, strategy: str = "ddp", on_gpu: bool | None = None
) -> int | None:
    """The largest divisor of the per-GPU batch whose planned peak fits ``limit_bytes`` (None: not even 1). Under
    a dense mask over packed rows, rows stop at the seed's 4 examples: more buys nothing and costs quadratically."""
    per_gpu_batch = recipe.global_batch_size // num_gpus
    cap = DENSE_MASK_EXAMPLES_PER_ROW if dense_mask_over_packed_rows(recipe, on_gpu) else per_gpu_batch
    fitting = [
        mb
        for mb in range(1, min(per_gpu_batch, cap) + 1)
        if per_gpu_batch % mb == 0 and memory(shape, recipe, mb, num_gpus, strategy).total <= limit_bytes
    ]
    return max(fitting) if fitting else None


# ---------------------------------------------------------------- time


def flops_per_token(shape: Shape, recipe: Recipe) -> dict[str, float]:
    """Forward, activation-gradient backward (frozen weights get no weight gradient), recompute, LoRA, attention."""
    dense = 2 * (shape.quantizable + shape.vocab * shape.hidden)  # every matmul weight once, LM head included
    attention = 2 * 2 * shape.layers * shape.hidden * (recipe.max_length / 2)  # QK^T and AV, causal average
    lora = 2 * recipe.lora_r * shape.layers * (shape.lora_inputs_per_layer + lora_outputs_per_layer(shape, recipe))
    terms = {
        "forward": dense + attention + lora,
        "backward (activation gradients)": dense + 2 * attention + 2 * lora,  # + LoRA weight gradients
        "recompute (checkpointing)": (dense - 2 * shape.vocab * shape.hidden + attention + lora)
        if recipe.gradient_checkpointing
        else 0.0,
    }
    terms["total"] = sum(terms.values())
    return terms


def lora_outputs_per_layer(shape: Shape, recipe: Recipe) -> int:
    """Sum of out_features over one layer's adapted modules, from the exact trainable count: r x (in + out) per
    module, plus DoRA's magnitude per output row."""
    r = max(recipe.lora_r, 1)
    per_layer_trainable = shape.trainable // max(shape.layers, 1)
    return (per_layer_trainable - r * shape.lora_inputs_per_layer) // (r + (1 if recipe.use_dora else 0))
