"""Base model (NF4 or not) and the LoRA adapter on it."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.recipe.schema import ALL_LINEAR, AUTO, Recipe, RecipeError, nearest


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)  # names are checked against the recipe's choices when it loads


def trainable_token_targets(model: Any, token_ids: list[int]) -> list[int] | dict[str, list[int]]:
    """PEFT's ``trainable_token_indices`` that train these tokens' rows wherever the model reads or writes them.

    A list targets the input embedding only; PEFT then ties a tied LM head to those trained rows by itself. An
    untied head is a matrix of its own whose (zero) rows would stay untrained, so it is named next to the
    embedding. Only the chosen rows are trained and saved with the adapter, never the whole matrix.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return list(token_ids)
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(embedding)]: list(token_ids), names[id(head)]: list(token_ids)}


def quantization_kwargs(recipe: Recipe) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` arguments for the recipe's base, dtypes by name; None for an unquantized base.

    The one place the quantization is spelled out: training, merge, generate and the model card's load
    snippet all read it from the run's recipe, so they load the base exactly as training did.
    """
    if not recipe.load_in_4bit:
        return None
    return dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=recipe.bnb_4bit_compute_dtype,
        # Storage in the compute dtype makes the packed NF4 weights shardable by FSDP like any bf16 tensor.
        bnb_4bit_quant_storage=recipe.bnb_4bit_quant_storage,
    )


def quantization_config(recipe: Recipe) -> Any | None:
    kwargs = quantization_kwargs(recipe)
    if kwargs is None:
        return None
    from transformers import BitsAndBytesConfig

    dtypes = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    return BitsAndBytesConfig(**{k: torch_dtype(v) if k in dtypes else v for k, v in kwargs.items()})


@functools.cache  # decide (and say why) once per run
def available_attention(requested: str) -> str:
    """The attention implementation to use: flash-attention only when its package is installed; ``varlen``
    (PyTorch's own varlen flash kernel, :mod:`hf_lora_recipe.model.varlen_attention`) only on a GPU that runs it, and then
    registered with transformers under that name; on a CPU-only machine ``varlen`` is that module's per-example path."""
    import importlib.util

    if requested.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        log.warn(f"attn_implementation {requested} asked for but flash-attn is not installed: using sdpa")
        return "sdpa"
    if requested == "flex_attention":
        import torch

        if not torch.cuda.is_available():  # torch 2.13's flex attention has no backward on the CPU
            log.warn("attn_implementation flex_attention cannot train on a CPU (no backward there): using sdpa")
            return "sdpa"
    if requested == "varlen":
        import torch

        from hf_lora_recipe.model import varlen_attention as attention

        if torch.cuda.is_available() and not attention.varlen_available():
            log.warn("attn_implementation varlen needs a CUDA GPU with compute capability 8.0+: using sdpa")
            return "sdpa"
        return attention.register()
    return requested


def check_attention_name(recipe: Recipe) -> None:
    """``attn_implementation`` is a kernel the installed transformers registers, ours (varlen), or a Hub kernel
    (``org/repo``, which transformers fetches itself); anything else is refused before the base loads."""
    from hf_lora_recipe.model.varlen_attention import ATTENTION
    from hf_lora_recipe.upstream.transformers import registered_attention

    requested = recipe.attn_implementation
    known = sorted(registered_attention() | {ATTENTION, AUTO})
    if requested not in known and "/" not in requested:
        import transformers

        raise RecipeError(
            f"attn_implementation {requested!r} is not an attention transformers {transformers.__version__} knows "
            f"(nearest: {nearest(requested, known)}); one of {', '.join(known)}"
        )


# Attention kernels that take a packed row's example boundaries directly: padding-free costs them nothing.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "varlen", "flex_attention")


def padding_free(recipe: Recipe, on_gpu: bool | None = None) -> bool:
    """``auto``: on the CPU always; on a GPU with an attention that takes the examples' boundaries (flash-attention,
    PyTorch's varlen kernel, flex attention), which computes no padding and no cross-example scores.
    ``on_gpu``: for the machine a plan is made for (default: this one)."""
    if recipe.padding_free != "auto":
        return recipe.padding_free == "true"
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return not on_gpu or attention_for(recipe, on_gpu) in VARLEN_ATTENTION


def attention_for(recipe: Recipe, on_gpu: bool | None = None) -> str:
    """The attention a run uses: on this machine (``on_gpu`` None) what it has of what the recipe asks; planning
    for another machine, what the recipe asks (assumed installed there). ``auto``: ``varlen`` for padding-free
    rows on a CPU-only machine (each packed example attended on its own, the fastest exact path there), else
    ``sdpa``."""
    requested = recipe.attn_implementation
    if requested == AUTO:
        import torch

        gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        per_example = not gpu and recipe.padding_free != "false" and not recipe.compile
        requested = "varlen" if per_example else "sdpa"
    return available_attention(requested) if on_gpu is None else requested


def liger_off_reason() -> str | None:
    """Why Liger's kernels cannot run here (they are Triton, so CUDA only), or None when they can."""
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed: pip install 'hf-lora-recipe[fast]'"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.cache
def liger_active(requested: bool) -> bool:
    return requested and liger_off_reason() is None


def attention_in_use(model: Any) -> str:
    """The attention implementation the loaded model dispatches to."""
    from hf_lora_recipe.upstream.transformers import attention_implementation

    return attention_implementation(model)


def load_base_model(recipe: Recipe) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        revision=recipe.model_revision,
        trust_remote_code=recipe.trust_remote_code,
        attn_implementation=attention_for(recipe),
        dtype=torch.bfloat16 if recipe.bf16 else torch.float32,
    )
    quant = quantization_config(recipe)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            # Each process quantizes onto its own GPU; bitsandbytes otherwise picks cuda:0 for every rank.
            kwargs["device_map"] = {"": log.local_rank()}
    model = AutoModelForCausalLM.from_pretrained(recipe.model_name_or_path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def prepare_base(model: Any, recipe: Recipe) -> Any:
    """Freeze the base and set up (non-reentrant) checkpointing.

    With ``kbit_upcast_fp32`` a QLoRA base goes through PEFT's k-bit preparation, which also casts the parts
    bitsandbytes leaves unquantized (norms, embeddings, LM head) to fp32. By default they stay bf16, as
    loaded: the adapter trains against the base as stored, 2.75 GiB lighter on Llama-3-8B. Under FSDP they
    always stay bf16, the dtype its all-gather casts to (the FSDP2 path tests/test_engines.py runs).
    """
    from peft import prepare_model_for_kbit_training

    from hf_lora_recipe.distributed.engines import current_engine

    checkpointing_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks LoRA under DDP
    if getattr(model, "is_loaded_in_4bit", False) and current_engine().name != "fsdp" and recipe.kbit_upcast_fp32:
        # PEFT's preparation for its fp32 upcast (and freezing) only: checkpointing is switched on below, by its
        # current name (PEFT still calls the deprecated one).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    if recipe.gradient_checkpointing:
        from hf_lora_recipe.upstream.transformers import enable_checkpointing

        enable_checkpointing(model, checkpointing_kwargs)
        model.enable_input_require_grads()
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) with 4-bit packed weights counted as the parameters they stand for."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)  # bitsandbytes packs several 4-bit values per element
        count = quant_state.shape.numel() if quant_state is not None else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def trainable_line(trainable: int, total: int) -> str:
    """``trainable: 41.9M / 8030.3M (0.52%)``: the adapter against the base it adapts (total minus adapter)."""
    base = total - trainable
    return f"trainable: {_count(trainable)} / {_count(base)} ({trainable / base:.2%})"


# ---------------------------------------------------------------- checked before anything heavy loads


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def model_config(recipe: Recipe) -> Any:
    """The base's ``config.json`` as a transformers config (see :func:`read_model_config`)."""
    return read_model_config(recipe.model_name_or_path, recipe.model_revision, recipe.trust_remote_code)


def read_model_config(
    name: str, revision: str = "main", trust_remote_code: bool = False, where: str | None = None
) -> Any:
    """``config.json`` of a model folder or Hub id as a transformers config; a missing, malformed or unknown
    model is one :class:`RecipeError` starting with ``where`` (read from the folder, the cache or the Hub)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoConfig

    where = where or f"model_name_or_path {name}"
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise RecipeError(f"{where} is a file: give the base model's folder (holding config.json) or a Hub id")
        if not (path / "config.json").is_file():
            adapter = (path / "adapter_config.json").is_file()
            hint = " (an adapter folder: give its base model instead)" if adapter else ""
            raise RecipeError(f"{where}: no config.json in that folder{hint}; give a model folder or a Hub id")
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (ValueError, UnicodeDecodeError, AttributeError) as error:
            raise RecipeError(f"{where}: config.json is not valid JSON ({log.first_line(error)})") from None
    else:
        model_type = None
        looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
        try:
            if looks_like_path:
                raise HFValidationError(name)
            validate_repo_id(name)
        except HFValidationError:
            raise RecipeError(
                f"{where}: no such folder, and not a Hub model id (NAMESPACE/NAME); check the path"
            ) from None
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
                raise RecipeError(
                    f"{where}: no such folder, and the Hub model is not in the local cache while "
                    "HF_HUB_OFFLINE=1; download it once online (hf download "
                    f"{name}) or give a local folder"
                )
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - transformers/hub raise many classes; every one is one line here
        from hf_lora_recipe.upstream.transformers import (
            asks_for_remote_code,
            named_model_type,
            names_no_model_type,
            names_unknown_architecture,
        )

        message = log.first_line(error)
        if names_unknown_architecture(error):
            import transformers

            if model_type is None and names_no_model_type(error):
                raise RecipeError(
                    f"{where}: its config.json names no model_type, so transformers cannot tell the "
                    "architecture; is it a transformers model folder?"
                ) from None
            model_type = named_model_type(error) or model_type
            raise RecipeError(
                f"{where}: config.json has model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know; upgrade transformers, or set "
                "trust_remote_code true if the model ships its own code"
            ) from None
        if asks_for_remote_code(error):
            raise RecipeError(
                f"{where} ships its own modelling code: set trust_remote_code true if you trust it"
            ) from None
        raise RecipeError(f"{where}: cannot read its config.json ({message})") from None


def check_sizes(config: Any, where: str) -> None:
    """A config a LoRA run can use: decoder layers, a vocabulary and a hidden size, before anything is built."""
    text = config.get_text_config()
    for key in ("num_hidden_layers", "vocab_size", "hidden_size"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value < 1:
            raise RecipeError(
                f"{where}: config.json has {key} {value}, so there is nothing to adapt or train; is it complete?"
            )


def meta_model(config: Any, recipe: Recipe) -> Any:
    """The base as a causal LM on the meta device: its modules, no memory, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_sizes(config, f"model_name_or_path {recipe.model_name_or_path}")

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.trust_remote_code)
    except ValueError as error:
        raise RecipeError(
            f"model_name_or_path {recipe.model_name_or_path}: a {type(config).__name__} is not a causal "
            f"language model transformers can build ({log.first_line(error)})"
        ) from None
    # a tied LM head shares the embedding on the GPU, and so it must here, or it is counted twice (transformers
    # builds it untied under init_empty_weights)
    model.tie_weights()
    return model


def adaptable_types() -> tuple[type, ...]:
    """Module types PEFT's LoRA can wrap (bitsandbytes' 4-bit linears replace nn.Linear at load time)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def resolve_targets(model: Any, targets: list[str] | str) -> dict[str, list[str]]:
    """Each requested target -> the module names it adapts, matched as PEFT matches a list (the whole dotted
    name, or its ending after a dot); ``all-linear`` -> every linear layer but the output head.

    A target that matches nothing, or only modules LoRA cannot wrap, is a :class:`RecipeError` naming it and
    listing the linear layers this architecture has.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    linear = {name: m for name, m in modules.items() if isinstance(m, (torch.nn.Linear, Conv1D))}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in linear.items() if m is not output})
    available = f"linear layers of {type(model).__name__}: {', '.join(linear_names) or 'none'} (or {ALL_LINEAR})"
    if targets == ALL_LINEAR:
        matched = {ALL_LINEAR: [name for name, m in linear.items() if m is not output]}
        if not matched[ALL_LINEAR]:
            raise RecipeError(
                f"lora_target_modules: {ALL_LINEAR} matches nothing: {type(model).__name__} has no linear layers"
            )
        return matched
    resolved: dict[str, list[str]] = {}
    unmatched, unsupported = [], []
    for target in targets:
        names = [name for name in modules if name and (name == target or name.endswith("." + target))]
        adaptable = [name for name in names if isinstance(modules[name], adaptable_types())]
        if not names:
            unmatched.append(target)
        elif not adaptable:
            kinds = sorted({type(modules[name]).__name__ for name in names})
            unsupported.append(f"{target} ({'/'.join(kinds)})")
        resolved[target] = adaptable
    if unmatched:
        guesses = [nearest(t, linear_names) for t in unmatched] if linear_names else []
        guess = f" (nearest: {', '.join(guesses)})" if guesses else ""
        raise RecipeError(
            f"lora_target_modules: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} "
            f"no module of {type(model).__name__}{guess}; {available}"
        )
    if unsupported:
        raise RecipeError(
            f"lora_target_modules: {', '.join(unsupported)} cannot carry a LoRA adapter (not linear); {available}"
        )
    return resolved


def resolve_parameters(model: Any, parameters: list[str]) -> dict[str, list[str]]:
    """Each ``lora_target_parameters`` entry -> the parameters it adapts, matched as PEFT matches them (the whole
    dotted name or its ending after a dot); one that matches nothing is a :class:`RecipeError`."""
    names = [name for name, _ in model.named_parameters()]
    resolved = {p: [n for n in names if n == p or n.endswith("." + p)] for p in parameters}
    unmatched = [p for p, found in resolved.items() if not found]
    if unmatched:
        three_d = sorted(
            {n.split(".layers.", 1)[-1].split(".", 1)[-1] for n, q in model.named_parameters() if q.dim() == 3}
        )
        raise RecipeError(
            f"lora_target_parameters: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no "
            f"parameter of {type(model).__name__}; 3-D parameters there: {', '.join(three_d) or 'none'}"
        )
    return resolved
