"""Padding-free rows through PyTorch's own attention kernels are exact: per-example losses of a packed row equal
the losses of each example alone.

The model is a tiny fp32 Llama with grouped-query attention (4 query heads share 2 kv heads) and a softmax scale
that is not SDPA's default, so glue that drops either one changes the numbers. The examples are real ones
(alpaca, Llama-2 tokenizer), of different lengths, with masked prompts.
"""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_lora_recipe.model import varlen_attention as attention
from hf_lora_recipe.model.varlen_attention import ATTENTION, VARLEN_KWARGS

from .conftest import shared_asset


@pytest.fixture(scope="module")
def examples(alpaca_path, llama2_tokenizer):
    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.recipe.schema import Recipe

    recipe = Recipe(
        model_name_or_path=str(shared_asset("tokenizers/llama2")), dataset_name=str(alpaca_path), max_length=96
    )
    dataset, _ = build_sft_dataset(recipe, llama2_tokenizer)
    chosen = [{"input_ids": dataset[i]["input_ids"], "labels": dataset[i]["labels"]} for i in range(4)]
    assert len({len(e["input_ids"]) for e in chosen}) > 1  # boundaries in different places
    return chosen


@pytest.fixture(scope="module")
def model(llama2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(llama2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=llama2_tokenizer.pad_token_id,
        bos_token_id=llama2_tokenizer.bos_token_id,
        eos_token_id=llama2_tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.self_attn.scaling *= 0.7  # every attention path receives the module's scaling
    return model


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="none"
    )


def _per_example(model, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
    """Summed loss of each example in a packed row (the boundary prediction, next example's first token, is
    masked by the collator and cut here)."""
    with torch.no_grad():
        tokens = _token_losses(model(**batch, use_cache=False).logits, batch["labels"])
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    return [tokens[start : end - 1].sum() for start, end in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def unpacked(model, examples) -> list[torch.Tensor]:
    """Each example alone, through transformers' SDPA: the reference every packed path must equal."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return [
            _token_losses(
                model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits, torch.tensor([e["labels"]])
            ).sum()
            for e in examples
        ]


def _lengths(examples) -> list[int]:
    return [len(e["input_ids"]) for e in examples]


def _assert_equal_losses(packed, unpacked):
    for together, alone in zip(packed, unpacked):
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)


def _assert_leaks(packed, unpacked):
    """The first example has nothing before it; every later one must differ when it can see the others."""
    for leaked, alone in zip(packed[1:], unpacked[1:]):
        assert not torch.isclose(leaked, alone, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_packed_row_equals_unpacked(model, examples, unpacked, monkeypatch):
    """transformers' own flex_attention keeps packed examples apart (its block mask from the position ids).

    Run uncompiled: transformers compiles the mask and the kernel, ~20 s on this CPU; the eager path evaluates
    the same mask_mod densely, so this checks the masking, not the fused GPU kernel.
    """
    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking_utils
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(flex_integration.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    monkeypatch.setattr(
        masking_utils,
        "create_block_mask",
        lambda *args, **kwargs: create_block_mask(*args, **{**kwargs, "_compile": False}),
    )
    model.set_attn_implementation("flex_attention")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1

    packed = _per_example(
        model,
        {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": batch["labels"]},
        _lengths(examples),
    )
    _assert_equal_losses(packed, unpacked)
    # and the check can fail: without position ids the row is one long causal sequence
    _assert_leaks(
        _per_example(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]}, _lengths(examples)), unpacked
    )


def _reference_varlen(calls: list):
    """A per-segment causal SDPA with the kernel's signature, checking the contract the CUDA kernel relies on."""

    def kernel(query, key, value, cu_seq_lens, max_length, scale, enable_gqa, dtype):
        assert dtype is None  # an fp32 model: the real kernel would refuse it (test_register_names_and_refusals)
        assert query.dim() == key.dim() == 3 and query.shape[0] == key.shape[0] == int(cu_seq_lens[-1])
        assert cu_seq_lens.dtype == torch.int32 and isinstance(max_length, int)
        assert max_length == int(cu_seq_lens.diff().max())
        calls.append((cu_seq_lens.clone(), max_length, scale, enable_gqa))
        bounds = cu_seq_lens.tolist()
        out = []
        for start, end in zip(bounds, bounds[1:]):
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
            out.append(
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa
                )[0].transpose(0, 1)
            )
        return torch.cat(out)

    return kernel


def test_varlen_glue_packed_row_equals_unpacked(model, examples, unpacked, monkeypatch):
    """Tests OUR glue, not PyTorch's kernel: the kernel is CUDA-only, so its one call point
    (attention._flash_varlen) is replaced by a per-segment causal SDPA reference. What is checked is everything
    around it: the collator's cu_seq_lens, the (tokens, heads, dim) layout, GQA, the scaling, the mask bypass
    (no 4D mask built), and the fallbacks to the position ids and to a padding mask."""
    from transformers.masking_utils import create_causal_mask

    calls: list = []
    monkeypatch.setattr(attention, "_flash_varlen", _reference_varlen(calls))
    monkeypatch.setattr(attention, "computes_per_example", lambda query: False)  # the CUDA kernel's glue
    attention.register()
    model.set_attn_implementation(ATTENTION)
    lengths = _lengths(examples)

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)  # TRL's, as training uses
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    expected_cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    assert torch.equal(batch["cu_seq_lens_q"], expected_cu) and torch.equal(batch["cu_seq_lens_k"], expected_cu)
    assert batch["max_length_q"] == batch["max_length_k"] == max(lengths) and type(batch["max_length_q"]) is int

    # The mask bypass: for this name transformers builds no mask for a packed row, where sdpa builds a 4D one.
    embeds = torch.zeros(1, sum(lengths), model.config.hidden_size)
    assert create_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"]) is None
    model.set_attn_implementation("sdpa")
    assert create_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"]).dim() == 4
    model.set_attn_implementation(ATTENTION)

    _assert_equal_losses(_per_example(model, batch, lengths), unpacked)
    assert len(calls) == model.config.num_hidden_layers
    for cu_seq_lens, max_length, scale, enable_gqa in calls:
        assert torch.equal(cu_seq_lens, expected_cu) and max_length == max(lengths)
        assert scale == model.model.layers[0].self_attn.scaling and enable_gqa

    # Without the collator's kwargs the boundaries come from the position ids: same numbers.
    calls.clear()
    without = {k: v for k, v in batch.items() if k not in VARLEN_KWARGS}
    _assert_equal_losses(_per_example(model, without, lengths), unpacked)
    assert torch.equal(calls[0][0], expected_cu)

    # and the check can fail: boundaries that say "one sequence" let the examples see each other
    total = sum(lengths)
    merged = {**batch, "cu_seq_lens_q": torch.tensor([0, total], dtype=torch.int32), "max_length_q": total}
    merged.update(cu_seq_lens_k=merged["cu_seq_lens_q"], max_length_k=total)
    _assert_leaks(_per_example(model, merged, lengths), unpacked)

    # A padded batch (the non-padding-free collator) takes the mask path: each row's real tokens only.
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples[:2])
    with torch.no_grad():
        logits = model(**padded, use_cache=False).logits
    for row, alone in enumerate(unpacked[:2]):
        n = lengths[row]
        torch.testing.assert_close(
            _token_losses(logits[row : row + 1, :n], padded["labels"][row : row + 1, :n]).sum(),
            alone,
            rtol=1e-5,
            atol=1e-4,
        )


@pytest.mark.parametrize("path", ["cuda-kernel-glue", "cpu-per-example"])
def test_varlen_model_generates_like_sdpa(model, llama2_tokenizer, monkeypatch, path):
    """The same model can generate: the prompt runs through the glue (left padding: the mask path, real tokens
    gathered), each new token against the cache. Greedy scores equal sdpa's, with the CUDA kernel's glue
    (a reference kernel substituted) and with the CPU's own path."""
    calls: list = []
    if path == "cuda-kernel-glue":
        monkeypatch.setattr(attention, "_flash_varlen", _reference_varlen(calls))
        monkeypatch.setattr(attention, "computes_per_example", lambda query: False)
    attention.register()
    llama2_tokenizer.padding_side = "left"
    try:
        prompts = llama2_tokenizer(["Name three colours.", "Hi"], return_tensors="pt", padding=True)
    finally:
        llama2_tokenizer.padding_side = "right"
    assert not prompts["attention_mask"].all()
    scores = {}
    for name in ("sdpa", ATTENTION):
        model.set_attn_implementation(name)
        with torch.no_grad():
            out = model.generate(
                **prompts,
                max_new_tokens=4,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=llama2_tokenizer.pad_token_id,
            )
        scores[name] = torch.stack(out.scores)
    torch.testing.assert_close(scores[ATTENTION], scores["sdpa"], rtol=1e-5, atol=1e-4)
    if path == "cuda-kernel-glue":  # the prompts went through the glue once per layer, unpadded, a segment each
        real = prompts["attention_mask"].sum(-1).tolist()
        assert [call[0].tolist() for call in calls] == [[0, real[0], sum(real)]] * model.config.num_hidden_layers


def test_varlen_kwargs_do_not_change_sdpa(model, examples):
    """TRL hands the whole batch, boundary kwargs included, to the model: with sdpa they are ignored, bit for bit."""
    model.set_attn_implementation("sdpa")
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert all(name in batch for name in VARLEN_KWARGS)
    plain = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        with_kwargs, without = model(**batch, use_cache=False), model(**plain, use_cache=False)
    assert torch.equal(with_kwargs.logits, without.logits) and torch.equal(with_kwargs.loss, without.loss)


def test_register_names_and_refusals(model, monkeypatch):
    """register() is idempotent and makes the name loadable; the kernel runs only where it can; what the glue
    cannot compute exactly it refuses."""
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM

    assert attention.register() == attention.register() == ATTENTION
    assert AttentionInterface._global_mapping[ATTENTION] is attention.varlen_attention_forward
    assert ATTENTION in AttentionMaskInterface._global_mapping
    # the check from_pretrained and from_config run at construction: a registered name passes, others do not
    built = AutoModelForCausalLM.from_config(model.config, attn_implementation=ATTENTION)
    assert built.config._attn_implementation == ATTENTION
    with pytest.raises(ValueError, match="is not supported"):
        AutoModelForCausalLM.from_config(model.config, attn_implementation=ATTENTION + "_unregistered")
    if not torch.cuda.is_available():
        assert not attention.varlen_available()

    # the flash kernel's dtype: the query's if half; fp32 queries (upcast norms) run in autocast's, else the
    # half-precision model's; a plain fp32 model is refused before any kernel is called
    layer = model.model.layers[0].self_attn
    query = torch.zeros(1, 4, 3, 16)
    assert attention._kernel_dtype(query.bfloat16(), layer) is torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention._kernel_dtype(query, layer) is torch.bfloat16
    assert attention._kernel_dtype(query, layer) is None
    with monkeypatch.context() as patch:
        patch.setattr(layer.config, "dtype", torch.bfloat16)
        assert attention._kernel_dtype(query, layer) is torch.bfloat16
    flat = query[0].transpose(0, 1)
    with pytest.raises(ValueError, match="bf16"):
        attention._flash_varlen(flat, flat, flat, torch.tensor([0, 3], dtype=torch.int32), 3, None, False, None)

    monkeypatch.setattr(attention, "computes_per_example", lambda query: False)  # the CUDA kernel's refusals
    kv = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="dropout"):
        attention.varlen_attention_forward(layer, query, kv, kv, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="chunked prefill"):
        attention.varlen_attention_forward(layer, query, torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), None)
    with pytest.raises(NotImplementedError, match="sliding window"):
        attention.varlen_attention_forward(layer, query, kv, kv, None, sliding_window=2)


def test_boundaries_from_position_ids_and_mask():
    """Without the collator's kwargs: a row whose positions do not start at 0 (the rest of a wrapped example)
    still starts a segment; unpacked rows sharing one (1, L) position row are one segment each; a padding mask
    gives each row's real tokens, wherever the padding is."""
    cu, longest, indices = attention._segments(1, 5, None, torch.tensor([[5, 6, 7, 0, 1]]), {}, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5] and cu.dtype == torch.int32 and longest == 3 and indices is None
    cu, longest, _ = attention._segments(2, 4, None, torch.arange(4)[None], {}, torch.device("cpu"))
    assert cu.tolist() == [0, 4, 8] and longest == 4
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    cu, longest, indices = attention._segments(2, 4, mask, None, {}, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5] and longest == 3 and indices.tolist() == [1, 2, 3, 4, 5]


def test_the_cpu_per_example_path_equals_each_example_alone(model, examples, unpacked):
    """On the CPU ``varlen`` attends each packed example on its own (no kernel substituted): the same losses as
    each example through transformers' SDPA alone, and boundaries that merge the examples would be caught."""
    attention.register()
    model.set_attn_implementation(ATTENTION)
    try:
        lengths = _lengths(examples)
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
        _assert_equal_losses(_per_example(model, batch, lengths), unpacked)
        total = sum(lengths)
        merged = {**batch, "cu_seq_lens_q": torch.tensor([0, total], dtype=torch.int32), "max_length_q": total}
        merged.update(cu_seq_lens_k=merged["cu_seq_lens_q"], max_length_k=total)
        _assert_leaks(_per_example(model, merged, lengths), unpacked)
    finally:
        model.set_attn_implementation("sdpa")


def _eager_reference(q, k, v, scale, softcap=None, window=None, keep=None):
    """transformers' eager attention, written out: scores, cap, causal (and window, and padding) mask, softmax."""
    groups = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, kv_len = q.shape[-2], k.shape[-2]
    i = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    if keep is not None:
        allowed = allowed & keep[..., None, None, :].bool()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(("softcap", "window"), [(None, None), (30.0, None), (None, 3), (50.0, 4)])
def test_per_example_attention_handles_softcap_and_sliding_windows(softcap, window):
    """Gemma 2's logit softcap and Mistral/Qwen/Gemma sliding windows, per example and while decoding."""
    torch.manual_seed(0)
    lengths = [5, 9, 2]
    q, k, v = torch.randn(sum(lengths), 4, 8), torch.randn(sum(lengths), 2, 8), torch.randn(sum(lengths), 2, 8)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    rows = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # one packed row, (1, heads, tokens, dim)
    got = attention._per_example(*rows, cu, 0.3, True, softcap=softcap, sliding_window=window).squeeze(0)
    bounds = cu.tolist()
    for start, end in zip(bounds, bounds[1:]):
        part = (x[start:end].transpose(0, 1) for x in (q, k, v))
        expected = _eager_reference(*part, 0.3, softcap, window).transpose(0, 1)
        torch.testing.assert_close(got[start:end], expected, rtol=1e-5, atol=1e-5)
    # one new token against a left-padded cache
    query, key, value = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = attention._attend(query, key, value, 0.3, True, softcap=softcap, sliding_window=window, keep=keep)
    torch.testing.assert_close(
        got, _eager_reference(query, key, value, 0.3, softcap, window, keep), rtol=1e-5, atol=1e-5
    )


def test_varlen_on_a_cpu_only_machine_is_the_per_example_path():
    from hf_lora_recipe.model.loading import available_attention

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine varlen is the CUDA kernel")
    assert available_attention("varlen") == ATTENTION
    assert available_attention("sdpa") == "sdpa"


def test_auto_is_per_example_only_for_packed_rows_on_a_cpu_and_sdpa_elsewhere():
    from hf_lora_recipe.model.loading import attention_for, padding_free
    from hf_lora_recipe.planning.estimates import dense_mask_over_packed_rows
    from hf_lora_recipe.recipe.schema import Recipe

    default = Recipe()
    assert default.attn_implementation == "auto"
    assert attention_for(default, on_gpu=False) == ATTENTION  # padding-free on a CPU: each example on its own
    assert not dense_mask_over_packed_rows(default, on_gpu=False)  # so auto micro-batch does not cap the rows
    assert attention_for(default, on_gpu=True) == "sdpa" and not padding_free(default, on_gpu=True)
    assert attention_for(Recipe(padding_free="false"), on_gpu=False) == "sdpa"  # padded rows
    assert attention_for(Recipe(compile=True), on_gpu=False) == "sdpa"  # dynamo cannot trace the example loop
    assert attention_for(Recipe(attn_implementation="sdpa"), on_gpu=False) == "sdpa"  # an explicit choice stays
    if not torch.cuda.is_available():  # this machine, as a run resolves it
        assert attention_for(default) == ATTENTION
