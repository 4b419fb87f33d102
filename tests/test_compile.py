"""compile_decoder_layers: compiled layers train exactly as eager ones, the adapters' dropout included.

Tiny fp32 Llamas (hidden 64, 2 layers) with LoRA on all seven projections, built by the recipe's own path
(``load_base_model`` + ``add_adapter``), on the CPU with inductor's C++ backend. A compile costs tens of seconds
on a small CPU, so the file compiles two models, each once, and every test shares them:

* ``checkpointed``: fp32, non-reentrant checkpointing (the recipe's default), lora_dropout 0.5.
* ``quantized``: NF4 base (bitsandbytes on the CPU), no checkpointing, a forward hook on every adapter's dropout.

The references are eager models with the same weights. Compiled dropout draws from the eager generator
(``compiling.INDUCTOR_OPTIONS``), so with the same seed a compiled model must reproduce eager's loss *and*
gradients at lora_dropout 0.5: one comparison covers the numerics of compiled LoRA and the masks. lora_dropout 0
(PEFT's ``Identity``) is not compiled separately: ~30 s more for a graph that differs only by the masks.
"""

from __future__ import annotations

import pytest
import torch

from hf_lora_recipe.inits.adapter import add_adapter
from hf_lora_recipe.model.compile_layers import compile_decoder_layers
from hf_lora_recipe.model.loading import load_base_model
from hf_lora_recipe.recipe.schema import Recipe
from hf_lora_recipe.upstream.torch import compiled_call
from hf_lora_recipe.upstream.transformers import enable_checkpointing


P = 0.5  # the largest mask entropy: keep rate, agreement of independent masks and of equal ones are far apart
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LENGTHS = ((2, 12), (3, 20), (2, 27))  # (rows, tokens): none equals a model dimension (16, 64, 128), see below
STATS_BATCH = (3, 90)  # 17,280 mask elements per projection on the hidden size
VOCAB = 128


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def build(base_dir, *, quantized: bool = False, checkpointing: bool = False):
    recipe = Recipe(
        model_name_or_path=str(base_dir),
        load_in_4bit=quantized,
        bnb_4bit_compute_dtype="float32",
        bnb_4bit_quant_storage="float32",
        bf16=False,
        gradient_checkpointing=checkpointing,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=P,
        lora_target_modules=SEVEN,
        attn_implementation="sdpa",  # what auto resolves to when the layers are compiled
    )
    torch.manual_seed(1)  # LoRA A's initialisation
    model = add_adapter(load_base_model(recipe), recipe)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                # fp32 throughout, for an exact comparison: on a 4-bit base the adapter trains in bf16, whose
                # rounding a fused kernel does not repeat exactly (~5e-6 relative in the loss)
                param.data = param.data.float()
            if "lora_B" in name:  # B starts at zero, which would make every gradient of A zero
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.train()


def batch(rows: int, tokens: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def step(model, ids: torch.Tensor, seed: int | None = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward/backward from a fixed seed (None: where the generator stands): the loss and each LoRA
    matrix's gradient."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def assert_same(expected, actual) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def checkpointed(base_dir):
    """The compiled, checkpointed model, its first steps run over varying shapes: (model, new graphs)."""
    model = build(base_dir, checkpointing=True)
    assert compile_decoder_layers(model) == 2
    before = graphs()
    for rows, tokens in LENGTHS:
        step(model, batch(rows, tokens))
    return model, graphs() - before


@pytest.fixture(scope="module")
def eager(base_dir):
    return build(base_dir)


def test_one_graph_serves_every_layer_and_every_length(checkpointed):
    """Both layers and all three shapes ran on a single compiled graph: with ``dynamic=True`` no recompile per
    length, and the layers share the graph rather than compiling one each. (A length equal to a model dimension,
    e.g. the head size 16, would be duck-sized to it on the first compile and cost one recompile.)"""
    model, new_graphs = checkpointed
    assert new_graphs == 1
    layers = model.get_base_model().model.layers
    assert all(compiled_call(layer) is not None for layer in layers)


def test_compiled_checkpointed_training_equals_eager(checkpointed, eager):
    """Same seed, lora_dropout 0.5: the compiled model under checkpointing gives eager's loss and gradients
    (eager without checkpointing). The loss shows the forward drew eager's masks; the gradients show the
    backward's recomputation used the forward's masks, not fresh ones."""
    model, _ = checkpointed
    for rows, tokens in LENGTHS[:2]:
        ids = batch(rows, tokens)
        assert_same(step(eager, ids), step(model, ids))


def test_a_different_mask_would_be_detected(base_dir, eager):
    """Negative controls for the comparison above, eager only. A different seed (different masks) moves loss and
    gradients far beyond the tolerance. Checkpointing that does not restore the RNG state for its recomputation
    (the failure this file guards against) keeps the loss but changes the gradients."""
    ids = batch(*LENGTHS[0])
    reference = step(eager, ids, seed=0)
    other_seed = step(eager, ids, seed=1)
    assert abs(other_seed[0] - reference[0]) > 1e-3
    assert max_difference(other_seed[1], reference[1]) > 1e-3

    fresh_masks = build(base_dir)
    enable_checkpointing(fresh_masks.get_base_model(), {"use_reentrant": False, "preserve_rng_state": False})
    loss, grads = step(fresh_masks, ids, seed=0)
    torch.testing.assert_close(loss, reference[0], rtol=1e-6, atol=1e-6)
    assert max_difference(grads, reference[1]) > 1e-3


@pytest.fixture(scope="module")
def quantized(base_dir):
    """The compiled NF4 model, with the input and output of every adapter's dropout captured at each forward,
    its first steps run: (model, dropout modules by "layer.block.projection", new graphs)."""
    import bitsandbytes as bnb

    model = build(base_dir, quantized=True)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    # Without checkpointing layer 0's input does not require grad and the others' does: two graphs. Making it
    # require grad keeps this file at one compile per model.
    model.enable_input_require_grads()
    dropouts = {}
    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            # One hook function for all: dynamo guards on the hook, so a hook per layer would be a graph per layer.
            module.register_forward_hook(capture)
            dropouts[name.split("layers.", 1)[1].replace(".lora_dropout.default", "")] = module  # "0.self_attn.q_proj"
    assert compile_decoder_layers(model) == 2
    before = graphs()
    for rows, tokens in (LENGTHS[1], STATS_BATCH):
        step(model, batch(rows, tokens))
    return model, dropouts, graphs() - before


def capture(module, args, output) -> None:
    module.captured = (args[0].detach(), output.detach())


# The NF4 model is a second compile (~25-50 s on 2 cores): these two run with CI's slow tests. make test keeps
# test_compiled_checkpointed_training_equals_eager, whose equal loss at dropout 0.5 already shows the compiled
# forward draws eager's masks (so their statistics are eager dropout's); these check the statistics directly.
@pytest.mark.slow
def test_quantized_compiled_training_equals_eager(base_dir, quantized):
    """bitsandbytes' NF4 Linear4bit compiles inside the layer on the CPU, in one graph for both layers and both
    shapes, and trains as eager does, same seed, same masks."""
    model, _, new_graphs = quantized
    assert new_graphs == 1
    reference = build(base_dir, quantized=True)
    ids = batch(*LENGTHS[1])
    assert_same(step(reference, ids), step(model, ids))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


@pytest.mark.slow
def test_compiled_dropout_masks_are_fresh_independent_and_scaled(quantized):
    """On the compiled path: each adapter keeps 1-p of its input, scaled by 1/(1-p); adapters that read the same
    input (q/k/v, gate/up) draw independent masks, as do the two layers, neighbouring channels and tokens, and
    consecutive steps. Independent masks agree on p^2 + (1-p)^2 of the elements, equal ones on all of them."""
    model, dropouts, _ = quantized
    ids = batch(*STATS_BATCH)
    independent = P**2 + (1 - P) ** 2
    tolerance = 0.035  # 6.5 standard deviations of a rate over half the smallest mask (8,640 elements)

    step(model, ids, seed=10)
    assert len(dropouts) == 2 * 7
    masks = {}
    for key, module in dropouts.items():
        x, out = module.captured
        kept = out != 0
        masks[key] = kept
        assert abs(kept.float().mean().item() - (1 - P)) < tolerance, key
        torch.testing.assert_close(out, torch.where(kept, x / (1 - P), torch.zeros_like(x)), msg=key)
        assert agreement(kept[..., 0::2], kept[..., 1::2]) == pytest.approx(independent, abs=tolerance), key
        assert agreement(kept[:, 0::2], kept[:, 1::2]) == pytest.approx(independent, abs=tolerance), key
    for layer in "01":
        for a, b in (("q", "k"), ("q", "v"), ("k", "v")):
            pair = masks[f"{layer}.self_attn.{a}_proj"], masks[f"{layer}.self_attn.{b}_proj"]
            assert agreement(*pair) == pytest.approx(independent, abs=tolerance), (layer, a, b)
        pair = masks[f"{layer}.mlp.gate_proj"], masks[f"{layer}.mlp.up_proj"]
        assert agreement(*pair) == pytest.approx(independent, abs=tolerance), (layer, "gate", "up")
    for projection in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        assert agreement(masks[f"0.{projection}"], masks[f"1.{projection}"]) == pytest.approx(
            independent, abs=tolerance
        ), projection

    step(model, ids, seed=None)  # the next step, the generator not reset
    for key, module in dropouts.items():
        out = module.captured[1]
        assert agreement(out != 0, masks[key]) == pytest.approx(independent, abs=tolerance), key


def test_every_layer_proves_it_ran_compiled(checkpointed):
    """The run's check after step 1 (``check_compiled``) passes on the compiled model; each layer's compiled
    call was taken on every step so far (the fixture's three, and any another test ran on the shared model)."""
    from hf_lora_recipe.model.compile_layers import check_compiled

    model, _ = checkpointed
    assert check_compiled(model) == "compile: all 2 decoder layers ran compiled in step 1"
    first, second = (compiled_call(layer).calls for layer in model.get_base_model().model.layers)
    assert first == second >= len(LENGTHS)


class _Layers(torch.nn.Module):
    """A stand-in causal LM: what ``decoder_layers`` reads (``base_model_prefix`` and ``.model.layers``)."""

    base_model_prefix = "model"

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


class _Breaks(torch.nn.Linear):
    def forward(self, x):
        torch._dynamo.graph_break()  # what an untraceable call inside a decoder layer does
        return super().forward(x)


def test_a_layer_that_cannot_be_one_graph_stops_the_run_in_one_line():
    from hf_lora_recipe.recipe.schema import RecipeError

    model = _Layers(_Breaks(4, 4))
    compile_decoder_layers(model)
    with pytest.raises(
        RecipeError,
        match=r"^compile: decoder layer 0 cannot be compiled as one graph \(.*"
        r"transformers \d[^)]*\); set compile false$",
    ):
        model.model.layers[0](torch.ones(2, 4))


def test_a_layer_that_never_ran_compiled_or_no_graph_stops_the_run():
    from hf_lora_recipe.model.compile_layers import check_compiled
    from hf_lora_recipe.recipe.schema import RecipeError
    from hf_lora_recipe.upstream.torch import fresh_dynamo_counters

    model = _Layers(torch.nn.Linear(4, 4))
    compile_decoder_layers(model)  # never called: the layer ran eagerly or not at all
    with pytest.raises(
        RecipeError,
        match=r"^compile: true was asked, but after step 1 decoder layers \[0\] never ran "
        r"their compiled call \(transformers .*\); set compile false or report this$",
    ):
        check_compiled(model)
    compiled_call(model.model.layers[0]).calls = 1  # called, but dynamo compiled nothing (TORCHDYNAMO_DISABLE)
    with fresh_dynamo_counters(), pytest.raises(RecipeError, match="dynamo compiled no graph"):
        check_compiled(model)


class _ContextSlot:
    """`kernels`' CompileableContextVar in small: a global that, once written under compilation, stays a global
    (the lasting flag is the side effect dynamo refuses inside a checkpoint)."""

    def __init__(self):
        self.value, self.uses_global = None, False

    def set(self, value):
        if torch.compiler.is_compiling():
            self.uses_global = True
        previous, self.value = self.value, value
        return previous

    def reset(self, token):
        self.value = token


_ACTIVE = _ContextSlot()


class _WritesAGlobalUnderCheckpoint(torch.nn.Module):
    """What transformers >= 5.25's attention does through the `kernels` package: a global write and reset around
    the forward, here inside a non-reentrant checkpoint as the recipe's checkpointing runs it."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def _inner(self, x):
        token = _ACTIVE.set("kernel")
        try:
            return torch.relu(self.linear(x))
        finally:
            _ACTIVE.reset(token)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self._inner, x, use_reentrant=False)


def test_a_global_written_and_reset_under_checkpoint_still_compiles_whole():
    """Without the checkpoint side-effect switch dynamo falls back to eager for such a layer (transformers 5.25
    trained eagerly under compile: true); with it the layer is one graph and its gradient is eager's."""
    from hf_lora_recipe.model.compile_layers import check_compiled

    torch.manual_seed(0)
    layer = _WritesAGlobalUnderCheckpoint()
    x = torch.randn(3, 4, requires_grad=True)
    layer(x).sum().backward()
    expected = x.grad.clone()
    x.grad = None
    model = _Layers(layer)
    compile_decoder_layers(model)
    before = graphs()
    model.model.layers[0](x).sum().backward()
    assert graphs() - before == 1
    torch.testing.assert_close(x.grad, expected)
    assert check_compiled(model).startswith("compile: all 1 decoder layers ran compiled")
