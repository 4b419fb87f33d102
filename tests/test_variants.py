"""PEFT variants as recipe keys (use_rslora, use_dora, init_lora_weights, loraplus_lr_ratio): each passed to
PEFT, proven to take effect on the built model (or the run stops), counted by plan, recorded in the card,
merged to the adapter's logits; initialisations not offered yet are refused with the reason."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_lora_recipe.recipe.schema import LLAMA_PROJECTIONS, Recipe, RecipeError, load_recipe_dict

from .conftest import CLI, run_cli
from .fixtures import build_adapter_dir, probe_logits, train_capturing_logits
from .test_resilience import _args


VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "all": {"use_rslora": True, "use_dora": True, "init_lora_weights": "gaussian"},
}


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


# every variant on a bf16 base; all of them at once on an NF4 base (PEFT allows each there)
@pytest.mark.parametrize("variant, quantized", [(name, False) for name in VARIANTS] + [("all", True)])
def test_each_variant_is_the_one_peft_built(tiny_base, variant, quantized):
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import load_base_model

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=quantized, **VARIANTS[variant])
    model = add_adapter(load_base_model(recipe), recipe)
    check_variants(model, recipe)
    layers = _lora_layers(model)
    assert len(layers) == 14
    expected = recipe.lora_alpha / (math.sqrt(recipe.lora_r) if recipe.use_rslora else recipe.lora_r)
    assert all(layer.scaling["default"] == pytest.approx(expected) for layer in layers)  # 8.0 rsLoRA, 2.0 plain
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == (14 if recipe.use_dora else 0) and all(p.requires_grad for p in magnitudes)
    assert all(p.dtype == torch.float32 for p in magnitudes)  # below bf16's resolution otherwise


@pytest.mark.parametrize(
    "asked, match",
    [
        ({"use_rslora": True}, "LoRA scaling 2, but use_rslora True"),
        ({"use_dora": True}, "use_dora True, but the layer has no trainable DoRA magnitude"),
    ],
)
def test_a_variant_peft_did_not_build_stops_the_run(tiny_base, asked, match):
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import load_base_model

    built = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    model = add_adapter(load_base_model(built), built)  # plain LoRA, as a config that ignored the key would build
    with pytest.raises(RuntimeError, match=match):
        check_variants(model, Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, **asked))
    layer = _lora_layers(model)[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    with pytest.raises(RuntimeError, match="lora_B is not zero at step 0"):
        check_variants(model, built)


def test_loraplus_gives_b_the_ratio_and_a_broken_optimizer_is_caught(tiny_base):
    from peft.optimizers import create_loraplus_optimizer

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.training.trainer import check_loraplus

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    model = add_adapter(load_base_model(recipe), recipe)
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
    check_loraplus(optimizer, model, 1e-4, 16)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with pytest.raises(RuntimeError, match=r"LoRA\+: .*lora_B.* learns at 0.0001, not 0.0016"):
        check_loraplus(plain, model, 1e-4, 16)


def test_training_with_every_variant_applies_them_end_to_end(tiny_base, alpaca_path, tmp_path):
    """rsLoRA + DoRA + LoRA+ through `train`: the logs say so, the adapter records them, DoRA's magnitudes moved
    off their initial row norms, and the card names the variant."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "adapter"
    result = run_cli(
        CLI,
        "train",
        *_args(
            tiny_base,
            alpaca_path,
            output_dir,
            "--max_steps",
            "2",
            "--use_rslora",
            "true",
            "--use_dora",
            "true",
            "--loraplus_lr_ratio",
            "16",
        ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA+: lora_B at learning_rate x 16 = 0.016, lora_A at 0.001 (checked per tensor)" in result.stdout
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is True
    adapter = load_file(output_dir / "adapter_model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    magnitude = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    initial = base["model.layers.0.self_attn.q_proj.weight"].float().norm(dim=1)  # B = 0: |W| row by row
    assert magnitude.shape == initial.shape and (magnitude - initial).abs().max() > 1e-5
    card = (output_dir / "README.md").read_text()
    assert "rsLoRA (scaling alpha/sqrt(r)), DoRA (trained magnitudes), LoRA+ (B learning rate x 16)" in card


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_merge_equals_the_adapter_for_each_variant(tiny_base, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.shipping.merging import merge

    adapter = build_adapter_dir(tiny_base, tmp_path / "adapter", **VARIANTS[variant])
    assert json.loads((adapter / "adapter_config.json").read_text())[f"use_{variant}"] is True
    inputs = torch.randint(3, 1000, (2, 24))
    with torch.no_grad():
        adapted = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter).eval()(inputs).logits
        )
        merged_dir = merge(str(adapter), tmp_path / "merged", dtype="float32")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(inputs).logits
    assert (adapted - base).abs().max() > 1e-3
    assert (merged - adapted).abs().max() < 1e-4


def test_plan_counts_doras_magnitudes_and_traces_every_variant_key(tiny_base):
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import count_parameters, load_base_model, model_config
    from hf_lora_recipe.planning.estimates import measure_shape
    from hf_lora_recipe.planning.plan import traceability

    plain = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False)
    dora = Recipe(
        model_name_or_path=str(tiny_base), load_in_4bit=False, use_dora=True, use_rslora=True, loraplus_lr_ratio=16
    )
    planned = measure_shape(model_config(dora), dora).trainable
    assert planned == count_parameters(add_adapter(load_base_model(dora), dora))[0]
    assert planned - measure_shape(model_config(plain), plain).trainable == 2 * (
        4 * 64 + 2 * 128 + 64
    )  # one per output row
    rows = {row["field"]: row for row in traceability(dora)}
    assert rows["LoraConfig.use_dora"]["differs_from_seed"] and rows["LoraConfig.use_rslora"]["differs_from_seed"]
    assert rows["create_loraplus_optimizer.loraplus_lr_ratio"]["value"] == 16
    assert not rows["LoraConfig.init_lora_weights"]["differs_from_library_default"]  # "true" is PEFT's True


@pytest.mark.parametrize(
    "values, match",
    [
        (
            {"init_lora_weights": "pissa"},
            "init_lora_weights: pissa rewrites the base weights .* set load_in_4bit false",
        ),
        ({"init_lora_weights": "olora", "load_in_4bit": True}, "init_lora_weights: olora rewrites the base weights"),
        ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4 rewrites the base weights"),  # the seed's base is NF4
        ({"init_lora_weights": "pissa_niter_0", "load_in_4bit": False}, "init_lora_weights must be one of"),
        ({"init_lora_weights": "loftq"}, "needs scipy and a CUDA device"),
        ({"init_lora_weights": "kaiming"}, "init_lora_weights must be one of true, gaussian"),
        ({"init_lora_weights": "orthogonal"}, "orthogonal needs an even lora_r .* and load_in_4bit false"),  # NF4 seed
        (
            {"init_lora_weights": "orthogonal", "load_in_4bit": False, "lora_r": 15},
            "orthogonal needs an even lora_r \\(got 15\\)",
        ),
        (
            {"init_lora_weights": "eva", "use_dora": True},
            "init_lora_weights: eva with use_dora: true is not supported",
        ),
        ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be positive"),
        (
            {"loraplus_lr_ratio": 16, "optim": "adafactor"},
            "loraplus_lr_ratio works with optim adamw_torch or adamw_torch_fused",
        ),
    ],
)
def test_variant_keys_that_cannot_work_are_refused_with_the_reason(values, match):
    with pytest.raises(RecipeError, match=match):
        _loaded(values)


def _loaded(values):
    """A recipe as the train, plan and preview parsers load it: the schema, then the init's own check."""
    from hf_lora_recipe import inits

    recipe = load_recipe_dict(values)
    inits.check_recipe(recipe)
    return recipe


# ------------------------------------------------------------------ PiSSA / OLoRA: base rewritten, saved converted

BASE_REWRITING = ["pissa", "pissa_niter_4", "olora"]
PROBE = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))  # probe_logits' default


def _logits(model, inputs=PROBE):
    return probe_logits(model, inputs)


@pytest.mark.parametrize("init", BASE_REWRITING)
def test_a_base_rewriting_init_is_proven_on_every_layer(tiny_base, init):
    """(a) the base changed, (b) W_res + s B0 A0 = W and (c) the step-0 logits are the base's: check_variants
    passes, and lora_B is not zero (the B = 0 check does not apply)."""
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import load_base_model

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False, init_lora_weights=init)
    model = add_adapter(load_base_model(recipe), recipe)
    check_variants(model, recipe)
    layers = _lora_layers(model)
    assert len(layers) == 14 and all(layer.lora_B["default"].weight.abs().max() > 0 for layer in layers)
    original = AutoModelForCausalLM.from_pretrained(tiny_base)
    q_proj = original.model.layers[0].self_attn.q_proj.weight
    assert (layers[0].get_base_layer().weight - q_proj).abs().max() > 1e-3  # layers[0] is layer 0's q_proj
    assert (_logits(model) - _logits(original)).abs().max() < 1e-5


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_adapter_is_never_published(tiny_base, tmp_path, init):
    """Saved as trained (rank r, init pissa/olora), it only fits the residual base: the final check refuses it."""
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.training.checkpoints import check_saved_adapter

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False, init_lora_weights=init)
    add_adapter(load_base_model(recipe), recipe).save_pretrained(tmp_path)
    with pytest.raises(
        RuntimeError,
        match=f"init_lora_weights {init} saved unconverted \\(init {init}, r 16, "
        "alpha 32; converted: true, 32, 64\\): it would only fit the residual base",
    ):
        check_saved_adapter(tmp_path, recipe, trained_steps=0)


@pytest.mark.parametrize("init", BASE_REWRITING)
def test_a_base_rewriting_init_that_did_not_apply_or_conserve_stops_the_run(tiny_base, init):
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.inits.pissa_olora import record_base
    from hf_lora_recipe.model.loading import load_base_model

    # record_base is given the resolved targets, as add_adapter gives them
    seven = {"lora_target_modules": LLAMA_PROJECTIONS}
    asked = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False, init_lora_weights=init, **seven)
    # built with plain LoRA, as a config that dropped the key would: the base was never rewritten
    plain = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False, **seven)
    base = load_base_model(plain)
    before = record_base(base, asked)
    with pytest.raises(
        RuntimeError,
        match=rf"^base_model\.model\.model\.layers\.0\.self_attn\.q_proj: "
        rf"init_lora_weights {init} left the base weight unchanged",
    ):
        check_variants(add_adapter(base, plain), asked, before)

    model = add_adapter(load_base_model(asked), asked)
    with torch.no_grad():  # B0 lost on one layer: W_res + s B A is no longer W
        _lora_layers(model)[5].lora_B["default"].weight.mul_(0.5)
    with pytest.raises(
        RuntimeError,
        match=r"^base_model\.model\.model\.layers\.0\.mlp\.up_proj: W_res \+ s B0 A0 "
        r"differs from the original weight",
    ):
        check_variants(model, asked)

    model = add_adapter(load_base_model(asked), asked)
    with torch.no_grad():  # every adapted layer conserved, but something else in the model changed
        model.base_model.model.model.norm.weight.mul_(2)
    with pytest.raises(RuntimeError, match=f"init_lora_weights {init}: the adapted model's step-0 logits differ"):
        check_variants(model, asked)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"use_dora": True}, "init_lora_weights: pissa with use_dora: true is not supported: PEFT's conversion"),
        (
            {"train_template_tokens": True},
            "init_lora_weights: pissa with train_template_tokens: true is not supported",
        ),
    ],
)
def test_what_the_conversion_does_not_carry_is_refused_at_recipe_load(values, match):
    _loaded({"load_in_4bit": False, "init_lora_weights": "pissa"})
    with pytest.raises(RecipeError, match=match):
        _loaded({"load_in_4bit": False, "init_lora_weights": "pissa", **values})


@pytest.mark.parametrize("engine", [("fsdp", 2), ("zero2",), ("zero3",)])
def test_base_rewriting_inits_are_refused_under_fsdp_and_deepspeed(engine):
    from hf_lora_recipe import inits
    from hf_lora_recipe.distributed.engines import Engine

    with pytest.raises(RecipeError, match="init_lora_weights: olora under FSDP or DeepSpeed is not supported"):
        inits.check_engine(Recipe(load_in_4bit=False, init_lora_weights="olora"), Engine(*engine).name)
    inits.check_engine(Recipe(load_in_4bit=False, init_lora_weights="olora"), "ddp")


def _train(monkeypatch, tiny_base, alpaca_path, output_dir, *extra):
    """``train`` in this process; returns the trained model's logits on PROBE, taken right after its save."""
    return train_capturing_logits(
        monkeypatch, _args(tiny_base, alpaca_path, output_dir, "--max_steps", "2", "--save_steps", "1", *extra)
    )


def _on_original_base(tiny_base, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter_dir))


@pytest.mark.parametrize("init", ["pissa", pytest.param("pissa_niter_4", marks=pytest.mark.slow), "olora"])
def test_training_saves_a_converted_adapter_of_the_original_base(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, init
):
    """The published adapter is rank 2r on the ORIGINAL base and computes what the trained model computed; so
    does its merge. The step-0 adapter stays in output_dir (ours), is never pushed."""
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.shipping.hub_upload import files_to_publish
    from hf_lora_recipe.shipping.merging import merge
    from hf_lora_recipe.shipping.output_dir import check_output_dir_is_ours

    output_dir = tmp_path / "adapter"
    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, "--init_lora_weights", init)
    assert code == 0
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (32, 64, True)  # lora_r 16, alpha 32
    converted = _on_original_base(tiny_base, output_dir)
    merged = _logits(
        AutoModelForCausalLM.from_pretrained(merge(str(output_dir), tmp_path / "merged", dtype="float32"))
    )
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_base))
    print(
        f"\n{init}: trained vs base {(trained - base).abs().max():.2e}; converted adapter on the original base vs "
        f"trained {(converted - trained).abs().max():.2e}; merged vs trained {(merged - trained).abs().max():.2e}"
    )
    assert (trained - base).abs().max() > 1e-3  # it trained: the comparisons below are not of two bases
    assert (converted - trained).abs().max() < 1e-4
    assert (merged - trained).abs().max() < 1e-4
    name = "OLoRA" if init == "olora" else "PiSSA" + (" (randomized SVD, 4 iterations)" if "niter" in init else "")
    assert (
        f"{name} init (saved converted: rank 32, alpha 64, a plain adapter of the original base)"
        in (output_dir / "README.md").read_text()
    )
    initial = json.loads((output_dir / "initial_adapter" / "adapter_config.json").read_text())
    assert initial["r"] == 16 and (output_dir / "initial_adapter" / "adapter_model.safetensors").is_file()
    assert not any("initial_adapter" in str(path) for path in files_to_publish(output_dir))
    check_output_dir_is_ours(output_dir)  # initial_adapter/ is ours: no refusal


@pytest.mark.slow  # several trainings in a row: the default suite keeps its time budget
def test_resume_and_publish_only_convert_against_the_saved_initial_adapter(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, capsys
):
    """pissa_niter_N draws from torch's RNG: the seed makes a rerun's initialisation the saved one, which is
    checked; another seed is refused before training. A run that never wrote its adapter writes it converted."""
    from safetensors.torch import load_file, save_file

    output_dir = tmp_path / "adapter"
    flags = ("--init_lora_weights", "pissa_niter_4")
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags)[0] == 0
    first = load_file(output_dir / "adapter_model.safetensors")

    for name in ("adapter_model.safetensors", "adapter_config.json"):  # as if it died before publishing
        (output_dir / name).unlink()
    capsys.readouterr()
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags)[0] == 0
    out = capsys.readouterr().out
    assert "without training" in out and "this rerun's initialisation equals" in out
    rewritten = load_file(output_dir / "adapter_model.safetensors")
    assert first.keys() == rewritten.keys() and all((first[k] == rewritten[k]).all() for k in first)

    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "3")
    out = capsys.readouterr().out
    assert code == 0 and "resuming from" in out and "this rerun's initialisation equals" in out
    assert json.loads((output_dir / "training_results.json").read_text())["optimizer_steps"] == 3
    assert (_on_original_base(tiny_base, output_dir) - trained).abs().max() < 1e-4

    # another seed draws another initialisation: the run identity refuses it before anything loads
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "4", "--seed", "7")[0] == 2
    assert "seed 42 -> 7" in capsys.readouterr().err
    # a saved initialisation that no longer matches what the recipe draws is caught by the residual-base check
    saved_path = output_dir / "initial_adapter" / "adapter_model.safetensors"
    saved = load_file(saved_path)
    save_file({k: v * 2 if ".lora_B." in k else v for k, v in saved.items()}, saved_path)
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "4")[0] == 2
    assert (
        "the pissa_niter_4 initialisation of this rerun differs from the one saved in "
        f"{output_dir / 'initial_adapter'}"
    ) in capsys.readouterr().err
    assert not (output_dir / "checkpoint-4").exists()


# ------------------------------------------------------------------ orthogonal: B and A non-zero, B A = 0


@pytest.mark.parametrize("bf16", [False, True])
def test_orthogonal_starts_at_the_base_with_non_zero_factors(tiny_base, bf16):
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.model.loading import load_base_model

    recipe = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=bf16, init_lora_weights="orthogonal")
    model = add_adapter(load_base_model(recipe), recipe)
    check_variants(model, recipe)
    layers = _lora_layers(model)
    assert all(layer.lora_B["default"].weight.abs().max() > 0.01 for layer in layers)  # not the B = 0 of the others
    adapted = _logits(model)
    with model.disable_adapter():
        base = _logits(model)
    assert (adapted - base).abs().max() < (1e-5 if not bf16 else 0.05)  # bf16: PEFT rounds A and B to the base dtype

    plain = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=bf16)
    with pytest.raises(RuntimeError, match="init_lora_weights orthogonal should give non-zero A and B with B A = 0"):
        check_variants(add_adapter(load_base_model(plain), plain), recipe)  # built plain: B = 0
    with torch.no_grad():
        layers[3].lora_B["default"].weight.normal_()  # B no longer orthogonal to A: step 0 is not the base
    with pytest.raises(RuntimeError, match=r"layers.0.self_attn.o_proj: init_lora_weights orthogonal .* \|B A\|"):
        check_variants(model, recipe)


def test_orthogonal_trains_and_merges_to_the_adapters_logits(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers
):
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.shipping.merging import merge

    output_dir = tmp_path / "adapter"
    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, "--init_lora_weights", "orthogonal")
    assert code == 0
    assert json.loads((output_dir / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    on_base = _on_original_base(tiny_base, output_dir)  # PEFT re-draws A, B at load, then loads the trained ones
    merged = _logits(
        AutoModelForCausalLM.from_pretrained(merge(str(output_dir), tmp_path / "merged", dtype="float32"))
    )
    assert (trained - _logits(AutoModelForCausalLM.from_pretrained(tiny_base))).abs().max() > 1e-3
    assert (on_base - trained).abs().max() < 1e-4 and (merged - trained).abs().max() < 1e-4
    assert "init_lora_weights orthogonal" in (output_dir / "README.md").read_text()


# ------------------------------------------------------------------ EVA: A and the ranks from the training data


def _eva_state(model, ranks):
    """A state as PEFT's EVA pass returns it: each adapted layer's name -> orthonormal rows (its top components)."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(0)
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    return {
        name: torch.linalg.qr(torch.randn(layer.in_features, max(rank, 1), generator=generator))[0]
        .T[:rank]
        .contiguous()
        for (name, layer), rank in zip(layers, ranks, strict=True)
    }


def _eva_model(tiny_base, **values):
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import load_base_model

    recipe = Recipe(
        model_name_or_path=str(tiny_base), init_lora_weights="eva", **{"load_in_4bit": False, "bf16": False, **values}
    )
    return add_adapter(load_base_model(recipe), recipe), recipe


# layers.0.q_proj gives its 16 to k_proj: rank 0 unwraps it, and the budget 16 x 14 modules is kept
EVA_RANKS = [0, 32] + [16] * 12


def test_eva_is_proven_on_every_layer_and_what_eva_did_not_set_stops_the_run(tiny_base, tmp_path):
    from hf_lora_recipe.inits.adapter import add_adapter, check_variants
    from hf_lora_recipe.inits.eva_data_pass import rank_line
    from hf_lora_recipe.inits.eva_state import apply_state
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.training.checkpoints import check_saved_adapter

    model, recipe = _eva_model(tiny_base)
    with pytest.raises(RuntimeError, match=r"layers\.0\.self_attn\.q_proj: lora_A's rows are not orthonormal"):
        check_variants(model, recipe)  # built, but no data pass yet: PEFT's Kaiming A
    apply_state(model, _eva_state(model, EVA_RANKS))
    check_variants(model, recipe)
    assert len(_lora_layers(model)) == 13 and _lora_layers(model)[0].lora_A["default"].weight.shape == (32, 64)
    config = model.peft_config["default"]
    assert config.rank_pattern == {"model.layers.0.self_attn.k_proj": 32}
    assert config.alpha_pattern == {"model.layers.0.self_attn.k_proj": 64}  # alpha/r kept: scaling 2 everywhere
    assert rank_line(model, 14) == (
        "EVA ranks: min 16, max 32, total 224 over 13 layers (budget r 16 x 14 "
        "modules, at most 32 per layer; 1 layer(s) got rank 0 and no adapter)"
    )
    model.save_pretrained(tmp_path / "adapter")
    check_saved_adapter(tmp_path / "adapter", recipe, trained_steps=0)  # each tensor at its layer's rank

    plain = Recipe(model_name_or_path=str(tiny_base), load_in_4bit=False, bf16=False)
    with pytest.raises(RuntimeError, match="init_lora_weights eva: the adapter was built with init_lora_weights True"):
        check_variants(add_adapter(load_base_model(plain), plain), recipe)
    a = _lora_layers(model)[3].lora_A["default"].weight
    with torch.no_grad():  # one component no longer of unit length
        a[0].mul_(1.5)
    with pytest.raises(
        RuntimeError,
        match=r"layers\.0\.mlp\.gate_proj: lora_A's rows are not orthonormal "
        r"\(\|A A\^T - I\| 1\.2",
    ):
        check_variants(model, recipe)
    with torch.no_grad():
        a[0].div_(1.5)
    config.rank_pattern["model.layers.0.self_attn.k_proj"] = 16  # the config no longer says what the layer holds
    with pytest.raises(RuntimeError, match=r"k_proj: EVA rank 16 in rank_pattern \(at most 32\), but A is \(32, 64\)"):
        check_variants(model, recipe)

    short, _ = _eva_model(tiny_base)
    apply_state(short, _eva_state(short, [16] * 13 + [8]))
    with pytest.raises(RuntimeError, match="the layers' ranks sum to 216, not EVA's budget r 16 x 14 modules = 224"):
        check_variants(short, recipe)
    saved = tmp_path / "adapter" / "adapter_config.json"
    saved.write_text(saved.read_text().replace('"init_lora_weights": "eva"', '"init_lora_weights": true'))
    with pytest.raises(RuntimeError, match="init_lora_weights True, rank_pattern .*: not the EVA adapter"):
        check_saved_adapter(tmp_path / "adapter", recipe, trained_steps=0)


def _fake_trainer(model, batches=40, length=24):
    """What the EVA pass uses of a trainer, with random token batches (fully supervised)."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 32000, (2, length), generator=generator) for _ in range(batches)]
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in rows]
    return SimpleNamespace(
        model=model, get_train_dataloader=lambda: data, accelerator=SimpleNamespace(_dataloaders=[])
    )


def test_eva_on_an_nf4_base_and_a_pass_that_does_not_converge(tiny_base, monkeypatch):
    """The data pass on a 4-bit base (adapter weights bf16): A orthonormal to bf16 rounding. Capped below
    convergence, the run stops naming a layer, with PEFT's hooks removed."""
    from peft.tuners.lora.eva import _Hook

    from hf_lora_recipe.inits import eva_data_pass as eva_pass
    from hf_lora_recipe.inits import eva_state as eva
    from hf_lora_recipe.inits.adapter import check_variants, finish_adapter

    model, recipe = _eva_model(tiny_base, load_in_4bit=True, bf16=True, lora_r=2)
    state = eva_pass.data_pass(_fake_trainer(model))
    assert model.training  # the pass ran in eval mode and gave the mode back
    eva.apply_state(model, state)
    finish_adapter(model, recipe)
    check_variants(model, recipe)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert sum(eva.ranks(model).values()) == 2 * 14

    monkeypatch.setattr(eva_pass, "MAX_BATCHES", 3)
    model, recipe = _eva_model(tiny_base, lora_r=2)
    with pytest.raises(
        RecipeError,
        match=r"^init_lora_weights: eva: the input components of \d+ layer\(s\) \(e\.g\. "
        r"model\.layers\.\d\.\S+\) were still moving after 3 batches",
    ):
        eva_pass.data_pass(_fake_trainer(model))
    assert not any(isinstance(hook, _Hook) for module in model.modules() for hook in module._forward_hooks.values())
    assert model.training


@pytest.mark.slow  # several trainings in a row: the default suite keeps its time budget
def test_training_with_eva_saves_its_ranks_and_resumes_on_them(
    tiny_base, alpaca_path, tmp_path, monkeypatch, keep_signal_handlers, capsys
):
    """`train` with EVA: the data order is the plain run's (same digest); the adapter, on a freshly loaded base and
    merged, computes what the trained model computed; the card gives the ranks; a rerun resumes on the saved
    state without a second pass."""
    import re

    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.shipping.hub_upload import files_to_publish
    from hf_lora_recipe.shipping.merging import merge
    from hf_lora_recipe.shipping.output_dir import check_output_dir_is_ours

    output_dir = tmp_path / "adapter"
    flags = ("--init_lora_weights", "eva", "--lora_r", "4", "--final_eval_examples", "0")
    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags)
    out = capsys.readouterr().out
    assert code == 0 and "EVA: every layer's top input components converged after" in out
    found = re.search(r"EVA ranks: min (\d+), max (\d+), total 56 over \d+ layers \(budget r 4 x 14 modules", out)
    assert found and int(found[1]) < 4 < int(found[2])  # redistributed, not r everywhere
    digest = re.search(r"data digest (\w+)", out)[1]
    assert (
        _train(monkeypatch, tiny_base, alpaca_path, tmp_path / "plain", "--lora_r", "4", "--final_eval_examples", "0")[
            0
        ]
        == 0
    )
    assert f"data digest {digest}" in capsys.readouterr().out  # the pass changed neither the order nor the RNG

    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"] and config["alpha_pattern"]
    on_base = _on_original_base(tiny_base, output_dir)
    merged = _logits(
        AutoModelForCausalLM.from_pretrained(merge(str(output_dir), tmp_path / "merged", dtype="float32"))
    )
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_base))
    with capsys.disabled():
        print(
            f"\neva: trained vs base {(trained - base).abs().max():.2e}; adapter on a fresh base vs trained "
            f"{(on_base - trained).abs().max():.2e}; merged vs trained {(merged - trained).abs().max():.2e}"
        )
    assert (trained - base).abs().max() > 1e-3
    assert (on_base - trained).abs().max() < 1e-4 and (merged - trained).abs().max() < 1e-4
    assert (
        f"EVA init (A from the training data's principal input directions; ranks {found[1]}-{found[2]} per layer, "
        "total 56" in (output_dir / "README.md").read_text()
    )
    assert (output_dir / "eva_state" / "eva_state.safetensors").is_file()
    assert not any("eva_state" in str(path) for path in files_to_publish(output_dir))
    check_output_dir_is_ours(output_dir)

    code, trained = _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "3")
    out = capsys.readouterr().out
    assert code == 0 and "resuming from" in out and "converged after" not in out
    assert f"(loaded from {output_dir / 'eva_state' / 'eva_state.safetensors'})" in out
    assert json.loads((output_dir / "training_results.json").read_text())["optimizer_steps"] == 3
    assert (_on_original_base(tiny_base, output_dir) - trained).abs().max() < 1e-4

    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, "--lora_r", "4", "--max_steps", "4")[0] == 2
    assert "was trained with another recipe (init_lora_weights eva -> true" in capsys.readouterr().err
    (output_dir / "eva_state" / "eva_state.safetensors").unlink()
    assert _train(monkeypatch, tiny_base, alpaca_path, output_dir, *flags, "--max_steps", "4")[0] == 2
    assert "eva_state.safetensors is missing, so the ranks EVA gave the checkpoint's adapter are unknown" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("key", ["use_dora", "use_rslora", "train_template_tokens", "streaming"])
def test_eva_with_what_it_was_not_verified_with_is_refused(key):
    _loaded({"init_lora_weights": "eva"})  # on the seed's NF4 base: allowed
    values = {"init_lora_weights": "eva", key: True, **({"max_steps": 10} if key == "streaming" else {})}
    with pytest.raises(RecipeError, match=f"^init_lora_weights: eva with {key}: true is not supported: "):
        _loaded(values)


@pytest.mark.parametrize("engine", [("fsdp", 2), ("zero2",), ("zero3",)])
def test_eva_is_refused_under_fsdp_and_deepspeed(engine):
    from hf_lora_recipe import inits
    from hf_lora_recipe.distributed.engines import Engine

    with pytest.raises(RecipeError, match="init_lora_weights: eva under FSDP or DeepSpeed is not supported"):
        inits.check_engine(Recipe(init_lora_weights="eva"), Engine(*engine).name)
    inits.check_engine(Recipe(init_lora_weights="eva"), "ddp")
