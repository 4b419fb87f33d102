"""Padding-free training on a GPU without the flash-attn package: PyTorch's own varlen flash kernel
(``torch.nn.attention.varlen.varlen_attn``, CUDA only) behind the transformers attention name ``varlen``.

Why: padding-free rows (examples concatenated, position ids restarting at 0) are exact with every attention, but
only a varlen kernel keeps them fast. With ``sdpa`` transformers turns the packed row into a dense
(1, 1, T, T) mask, which loses SDPA's flash and memory-efficient kernels; ``flash_attention_2`` needs the
flash-attn package (a CUDA build per torch version). Recent PyTorch (2.13 here) ships the FA2 kernel in ATen
and exposes its variable-length entry point; this module connects it to transformers:

* :func:`register` makes ``varlen`` a name that ``from_pretrained(attn_implementation=...)`` and
  ``set_attn_implementation`` accept, and registers flash-attention's mask function under it, so
  ``create_causal_mask`` returns None for a packed row (no 4D mask) and hands a 2D padding mask through.
* :func:`varlen_attention_forward` reads the examples' boundaries from ``cu_seq_lens_q``/``max_length_q``, the
  keyword arguments TRL's padding-free collator (1.16) puts in the batch, computed on the CPU. ``model(**batch)`` carries them down to every attention layer, where flash_attention_2
  reads them the same way. Computed on the CPU by the collator, they cost no device-to-host sync; without
  them the boundaries are derived from the 2D mask or the position ids, one sync per layer (as flash-attn does).

Training-only limits of the CUDA kernel, each refused with its reason rather than computed wrongly: no attention
dropout (the kernel has none), no softcap or attention sinks, no sliding window shorter than an example, no chunked
prefill against a KV cache. Single-token decoding (``generate``) goes through SDPA, so the same model can generate.

On the CPU the same name computes each example of a packed row on its own with SDPA (:func:`_per_example`), with
dropout, softcap and sliding windows as the model asks: the attention of one example is all that is computed, where
``sdpa`` computes the whole pack against a dense block-diagonal mask and discards the cross-example scores: exact,
and faster as soon as a pack holds several examples (docs/speed.md has the figures).
"""

from __future__ import annotations

from typing import Any

import torch


ATTENTION = "varlen"
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
HALF = (torch.float16, torch.bfloat16)


def varlen_available() -> bool:
    """PyTorch's varlen kernel can run here: a CUDA GPU of compute capability 8.0+ (the FA2 kernel's floor) and a
    torch that has ``torch.nn.attention.varlen``."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def register() -> str:
    """Make :data:`ATTENTION` a transformers attention name (idempotent: re-registering maps the same name to the
    same functions); returns the name. Call it in every process before the model loads with that name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(ATTENTION, varlen_attention_forward)
    # A name without a mask function would make create_causal_mask return None for every input, silently
    # dropping a padding mask too. Flash-attention's returns None for a packed or unpadded row and the 2D mask
    # when there is padding, which is what this function expects.
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)
    return ATTENTION


def _kernel_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype | None:
    """The dtype the flash kernel (fp16/bf16 only) computes this call in; None for a plain fp32 model. fp32
    queries of a half-precision model (norms upcast to fp32 on a 4-bit base) run in the autocast dtype, else the
    model's, as flash_attention_2's do."""
    if query.dtype in HALF:
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) in HALF:
        return torch.get_autocast_dtype(device)
    dtype = getattr(getattr(module, "config", None), "dtype", None)
    return dtype if dtype in HALF else None


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float | None,
    enable_gqa: bool,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """The one call into PyTorch's CUDA kernel, on (tokens, heads, head_dim) tensors: causal within each segment,
    computed in ``dtype``. The CPU tests substitute a per-segment SDPA reference for exactly this function."""
    if dtype is None:
        raise ValueError(
            f"attn_implementation {ATTENTION} runs in bf16/fp16 and this model computes in "
            f"{query.dtype}: load it in bf16 (bf16: true) or use sdpa"
        )
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(
        query.to(dtype),
        key.to(dtype),
        value.to(dtype),
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        scale=scale,
        window_size=(-1, 0),
        enable_gqa=enable_gqa,
    )
    return out.to(query.dtype)


def computes_per_example(query: torch.Tensor) -> bool:
    """Whether this call takes the CPU's per-example path rather than the CUDA kernel."""
    return query.device.type == "cpu"


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None,
    enable_gqa: bool,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of (..., heads, q_len, dim) queries on (..., kv_heads, kv_len, dim) keys, the queries being
    the last q_len positions; ``keep``: a (..., kv_len) mask of real keys. SDPA where it can; the scores
    written out where the model caps them (softcap), as transformers' eager attention computes them."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    plain = keep is None and (sliding_window is None or sliding_window >= kv_len)
    if softcap is None and plain and q_len == kv_len:  # the common case: SDPA's own causal path, no mask built
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
    rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
    columns = torch.arange(kv_len, device=query.device)[None, :]
    allowed = columns <= rows
    if sliding_window is not None:
        allowed = allowed & (rows - columns < sliding_window)
    if keep is not None:
        allowed = allowed & keep[..., None, None, :].bool()
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(query.dtype)
    return torch.nn.functional.dropout(weights, p=dropout, training=dropout > 0) @ value


def _per_example(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    scale: float | None,
    enable_gqa: bool,
    **features: Any,
) -> torch.Tensor:
    """The CPU's varlen over (batch, heads, length, dim) tensors: each segment of the flattened batch x length
    positions attended on its own (:func:`_attend`) on views of its row, so autograd keeps no copy of q, k or v.
    Returns (batch, length, heads, dim)."""
    batch, heads, length, _ = query.shape
    bounds = cu_seq_lens.tolist()
    out = []
    for start, end in zip(bounds, bounds[1:]):
        row, begin = divmod(start, length)
        stop = end - row * length
        if stop > length:
            raise ValueError(f"attn_implementation {ATTENTION}: an example crosses the end of row {row}")
        q, k, v = (x[row : row + 1, :, begin:stop] for x in (query, key, value))
        out.append(_attend(q, k, v, scale, enable_gqa, **features))
    return torch.cat(out, dim=2).transpose(1, 2).reshape(batch, length, heads, value.shape[-1])


def _segments(
    batch: int,
    length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    kwargs: dict[str, Any],
    device: torch.device,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(cumulative lengths, longest, indices of the real tokens or None) of the flattened (batch x length)
    tokens: from a padding mask, else the collator's kwargs, else the position ids (restarting at 0)."""
    if attention_mask is not None:  # padded rows: attend over the real tokens only, one segment per row
        mask = attention_mask.bool()
        lengths = mask.sum(-1, dtype=torch.int32)
        indices = mask.flatten().nonzero().flatten()
        return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)), int(lengths.max()), indices
    if all(kwargs.get(name) is not None for name in VARLEN_KWARGS):
        # Self-attention without a cache: the key boundaries are the query boundaries (comparing the two tensors
        # on the device would cost the sync these kwargs exist to avoid).
        return kwargs["cu_seq_lens_q"].to(device=device, dtype=torch.int32), int(kwargs["max_length_q"]), None
    if position_ids is None:
        position_ids = torch.arange(length, device=device)
    starts = position_ids.expand(batch, length) == 0
    starts[:, 0] = True  # a row never continues the one before it
    cu_seq_lens = torch.nn.functional.pad(starts.flatten().nonzero().flatten(), (0, 1), value=batch * length)
    return cu_seq_lens.to(torch.int32), int(cu_seq_lens.diff().max()), None


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (batch, heads, q_len, head_dim), key/value
    (batch, kv_heads, kv_len, head_dim), ``attention_mask`` 2D or None (see :func:`register`); returns
    (batch, q_len, heads, head_dim) and no weights."""
    batch, heads, length, _ = query.shape
    on_cpu = computes_per_example(query)
    if dropout and not on_cpu:
        raise ValueError(
            f"attn_implementation {ATTENTION}: PyTorch's varlen kernel has no attention dropout; "
            "set the model config's attention_dropout to 0 or use sdpa"
        )
    if s_aux is not None or (softcap is not None and not on_cpu):
        raise NotImplementedError(
            f"attn_implementation {ATTENTION} has no logit softcap or attention sinks: use sdpa or eager"
        )
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise NotImplementedError(f"attn_implementation {ATTENTION} is causal only")
    enable_gqa = key.shape[1] != heads  # the kernel shares each kv head across its query heads without copying
    features = {"dropout": dropout, "softcap": softcap, "sliding_window": sliding_window}

    if length != key.shape[2]:
        if length != 1:
            raise NotImplementedError(
                f"attn_implementation {ATTENTION}: {length} queries against {key.shape[2]} cached "
                "keys (chunked prefill) is not supported; use sdpa"
            )
        if on_cpu:  # one new token per row: every cached key that is not padding, within the window
            out = _attend(query, key, value, scaling, enable_gqa, keep=attention_mask, **features)
            return out.transpose(1, 2).contiguous(), None
        if sliding_window is not None and key.shape[2] > sliding_window:
            raise NotImplementedError(
                f"attn_implementation {ATTENTION}: no sliding window ({sliding_window}); use sdpa"
            )
        # One new token per row while generating: it sees every cached key that is not padding; SDPA does it.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=enable_gqa
        )
        return out.transpose(1, 2).contiguous(), None

    cu_seq_lens, longest, indices = _segments(batch, length, attention_mask, position_ids, kwargs, query.device)
    if sliding_window is not None and longest > sliding_window and not on_cpu:
        raise NotImplementedError(
            f"attn_implementation {ATTENTION}: an example of {longest} tokens exceeds the "
            f"model's sliding window ({sliding_window}); use sdpa"
        )
    if on_cpu and indices is None:
        return _per_example(query, key, value, cu_seq_lens, scaling, enable_gqa, **features), None
    # (batch, heads, length, dim) -> (batch * length, heads, dim): the kernel's token-major layout
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    if indices is not None:
        q, k, v = q[indices], k[indices], v[indices]
    if on_cpu:  # padded rows: the real tokens of each row, gathered, as one segment each
        flat = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out = _per_example(*flat, cu_seq_lens, scaling, enable_gqa, **features).squeeze(0)
    else:
        out = _flash_varlen(q, k, v, cu_seq_lens, longest, scaling, enable_gqa, _kernel_dtype(query, module))
    if indices is not None:  # padding positions come back as zeros, as flash_attention_2 leaves them
        out = out.new_zeros(batch * length, *out.shape[1:]).index_copy(0, indices, out)
    return out.view(batch, length, heads, value.shape[-1]), None
