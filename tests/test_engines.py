"""Scale-out engines: FSDP2 (LoRA and QLoRA) and DeepSpeed ZeRO-2/3 through ``accelerate launch`` with the
shipped configs, on 2 CPU processes (gloo), against one process: the same adapter, rank-r and trained,
loadable on an unsharded base, resumed after SIGKILL to the same end, each rank holding what plan predicts.
The fast tests check what is decided before loading: the engine read off accelerate's environment, the
combinations refused, a checkpoint resumed only by the engine family that wrote it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ACCELERATE, CLI, REPO_ROOT, run_cli
from .test_resilience import _adapter, _args, _free_port, _max_diff, _wait_for


CONFIGS = REPO_ROOT / "accelerate_configs"
STEPS = ["--max_steps", "10", "--save_steps", "2"]  # a kill at checkpoint-2 leaves 8 steps to spare
LORA = ["--load_in_4bit", "false", "--bf16", "false"]
QLORA = ["--load_in_4bit", "true", "--bf16", "true"]
# fp32 adapters: the same 8 examples per optimizer step, gradients reduced by the engine vs accumulated in one
# process (measured: 0 for FSDP2 and ZeRO-2, ~3e-7 for ZeRO-3). bf16 adapters (QLoRA): measured 0.
TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    """Every run here, launched or not, computes with one thread per process: a CPU matmul's result depends on how
    many threads split its reduction (AMX/oneDNN kernels flip a bf16 rounding at 2 threads vs 1), and the
    comparison is of the engines, not of thread counts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def _launch(config: str, *args: str) -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_lora_recipe.train",
        *args,
    ]


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def one_process(tiny_base, alpaca_path, tmp_path_factory):
    """The 1-process adapters every engine is compared with, by precision (trained on first use)."""
    trained: dict[str, Path] = {}

    def adapter(precision: str) -> Path:
        if precision not in trained:
            output_dir = tmp_path_factory.mktemp(f"one-process-{precision}")
            _ok(
                run_cli(
                    CLI,
                    "train",
                    *_args(tiny_base, alpaca_path, output_dir, *STEPS, *(QLORA if precision == "qlora" else LORA)),
                )
            )
            trained[precision] = output_dir
        return trained[precision]

    return adapter


def _holdings(stdout: str) -> dict[str, dict[str, tuple[float, float]]]:
    """rank -> component -> (held, planned) MiB, from the line each rank prints after step 1."""
    lines = re.findall(r"rank (\d)/2\] holds after step 1 \(MiB, held/planned for [^)]*\): (.*)", stdout)
    return {
        rank: {
            name: (float(held), float(planned))
            for name, held, planned in re.findall(r"([a-z0-9 -]+?) ([\d.]+)/([\d.]+)(?:, |$)", parts)
        }
        for rank, parts in lines
    }


def _check_loads_unsharded(tiny_base: Path, adapter_dir: Path, quantized: bool) -> None:
    """PeftModel.from_pretrained on a whole base puts exactly the file's tensors into the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.recipe.schema import Recipe

    base = (
        load_base_model(Recipe(model_name_or_path=str(tiny_base), load_in_4bit=True))
        if quantized
        else AutoModelForCausalLM.from_pretrained(tiny_base)
    )
    model = PeftModel.from_pretrained(base, adapter_dir)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    saved = _adapter(adapter_dir)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k].to(saved[k].dtype)) for k in saved)


def _kill_after_checkpoint(command: list[str], output_dir: Path, step: int) -> None:
    """Start the launch; once checkpoint-<step> is complete, SIGKILL the launcher and every worker (torchrun
    starts its workers in sessions of their own: killing the launcher's group alone would leave them training)."""
    import psutil

    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (output_dir / f"checkpoint-{step}" / "hf_lora_recipe.json").is_file(), process)
    finally:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for member in family:
            member.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=60)
    assert not (output_dir / "adapter_model.safetensors").exists()


ENGINES = {  # config -> (precision, engine as train names it, base sharded across the ranks)
    "fsdp_lora": ("lora", "FSDP2", True),
    "fsdp_qlora": ("qlora", "FSDP2", True),
    "deepspeed_zero2": ("lora", "DeepSpeed ZeRO-2", False),
    "deepspeed_zero3": ("lora", "DeepSpeed ZeRO-3", True),
}


def _whole_unquantized_bytes(tiny_base: Path, precision: str) -> int:
    """What one process holds of the base's non-4-bit weights (fp32 for LoRA here; bf16 beside a 4-bit base),
    counted from the checkpoint file, not from plan."""
    tensors = load_file(tiny_base / "model.safetensors")
    quantized = lambda key: "_proj." in key  # noqa: E731 - the decoder layers' linear weights bitsandbytes packs
    if precision == "qlora":
        return 2 * sum(t.numel() for k, t in tensors.items() if not quantized(k))
    return 4 * sum(t.numel() for t in tensors.values())


@pytest.fixture(scope="module")
def deepspeed_installed():
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # noqa: BLE001 - ImportError, or DeepSpeed refusing this torch
        message = (
            f"deepspeed is not importable ({type(error).__name__}: {error}); pip install "
            "'hf-lora-recipe[deepspeed]' to run these tests (make test-slow does)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(ENGINES))
def test_engine_trains_the_one_process_adapter_and_resumes_after_sigkill(
    config, tiny_base, alpaca_path, tmp_path, one_process, request
):
    precision, engine, sharded = ENGINES[config]
    if config.startswith("deepspeed"):
        request.getfixturevalue("deepspeed_installed")
    extra = [*STEPS, *(QLORA if precision == "qlora" else LORA)]
    uninterrupted = tmp_path / "uninterrupted"
    result = _ok(run_cli(*_launch(config, *_args(tiny_base, alpaca_path, uninterrupted, *extra))))
    assert f"{engine}: world size 2 x micro-batch 4 x gradient accumulation 1 = global batch 8" in result.stdout

    # the same adapter as one process, rank-r shaped and trained, loadable on a whole base
    adapter = _adapter(uninterrupted)
    assert len(adapter) == 28 and all(16 in tensor.shape for tensor in adapter.values())
    assert all(tensor.abs().max() > 0 for key, tensor in adapter.items() if "lora_B" in key)
    difference = _max_diff(adapter, _adapter(one_process(precision)))
    print(f"\n{config}: max |adapter difference| vs one process: {difference:.2e}")
    assert difference <= TOLERANCE
    _check_loads_unsharded(tiny_base, uninterrupted, quantized=precision == "qlora")

    # each rank holds its share, as plan predicts. DeepSpeed keeps gradients and optimizer state in flat buffers
    # of its own (released or outside the torch optimizer at the step): there only weights and adapter compare
    holdings = _holdings(result.stdout)
    assert set(holdings) == {"0", "1"}, result.stdout[-3000:]
    compared = ["4-bit weights", "other weights", "adapter"] + (
        [] if config.startswith("deepspeed") else ["gradients", "optimizer states"]
    )
    for rank, components in holdings.items():
        for name in compared:
            held, planned = components[name]
            assert held == pytest.approx(planned, rel=0.02, abs=1e-4), (rank, name, held, planned)
    whole = _whole_unquantized_bytes(tiny_base, precision) / 1024**2
    held = holdings["0"]["other weights"][0]
    assert held == pytest.approx(whole / 2 if sharded else whole, rel=0.02), (held, whole)  # sharded: half each

    # SIGKILL after checkpoint-2, the same command again: it resumes and ends where the uninterrupted run ended
    interrupted = tmp_path / "interrupted"
    command = _launch(config, *_args(tiny_base, alpaca_path, interrupted, *extra))
    _kill_after_checkpoint(command, interrupted, step=2)
    resumed = _ok(run_cli(*command))
    assert re.search(r"resuming from \S*checkpoint-(2|4|6)", resumed.stdout)
    difference = _max_diff(_adapter(uninterrupted), _adapter(interrupted))
    print(f"{config}: max |adapter difference| uninterrupted vs killed and resumed: {difference:.2e}")
    assert difference <= 1e-6

    # killed after its last checkpoint but before the final adapter: the rerun writes it from that checkpoint
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (interrupted / name).unlink()
    rewritten = _ok(run_cli(*command))
    assert "reached the last step (10) but the final adapter was never written" in rewritten.stdout
    assert _max_diff(_adapter(uninterrupted), _adapter(interrupted)) <= 1e-6


# ---------------------------------------------------------------- decided before loading (fast)


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({}, "one process"),
        ({"WORLD_SIZE": "2"}, "DDP"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP2"),
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}, "FSDP1"),  # accelerate's default version
        (
            {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "DeepSpeed ZeRO-3",
        ),
    ],
)
def test_the_engine_is_read_off_what_accelerate_launch_exports(monkeypatch, environment, expected):
    from hf_lora_recipe.distributed.engines import current_engine

    for name in (
        "WORLD_SIZE",
        "ACCELERATE_USE_FSDP",
        "FSDP_VERSION",
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert str(current_engine()) == expected


def test_a_deepspeed_config_file_gives_its_zero_stage(monkeypatch, tmp_path):
    from hf_lora_recipe.distributed.engines import current_engine

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    assert current_engine().name == "zero2"


@pytest.mark.parametrize(
    "engine, flags, recipe, match",
    [
        (("fsdp", 1), {}, {}, "FSDP1"),
        (("fsdp", 2), {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, {}, "_checkpoint_wrapped_module"),
        (("fsdp", 2), {}, {"load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"}, "floating tensors only"),
        (("fsdp", 2), {}, {"load_in_4bit": True, "bnb_4bit_quant_storage": "float32"}, "scramble"),
        (("zero3", 0), {}, {"load_in_4bit": True}, "ZeRO-3 with an NF4 base"),
    ],
)
def test_combinations_that_cannot_train_are_refused(monkeypatch, engine, flags, recipe, match):
    from hf_lora_recipe.distributed.engines import Engine, check_engine
    from hf_lora_recipe.recipe.schema import Recipe, RecipeError

    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING", raising=False)
    for name, value in flags.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RecipeError, match=match):
        check_engine(Recipe(**recipe), Engine(*engine))


def test_the_shipped_engine_settings_pass(monkeypatch):
    import importlib.util

    from hf_lora_recipe.distributed.engines import Engine, check_engine
    from hf_lora_recipe.recipe.schema import Recipe

    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING", raising=False)
    real = importlib.util.find_spec  # `make test` runs without the [deepspeed] extra: only its presence matters here
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a)
    )
    check_engine(Recipe(), Engine("fsdp", 2))  # the seed's QLoRA: NF4 stored in bf16
    check_engine(Recipe(load_in_4bit=False), Engine("fsdp", 2))
    check_engine(Recipe(load_in_4bit=False), Engine("zero3"))


def test_deepspeed_missing_is_one_line_before_loading(monkeypatch):
    import importlib.util

    from hf_lora_recipe.distributed.engines import Engine, check_engine
    from hf_lora_recipe.recipe.schema import Recipe, RecipeError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(RecipeError, match=r"pip install 'hf-lora-recipe\[deepspeed\]'"):
        check_engine(Recipe(load_in_4bit=False), Engine("zero2"))


def test_an_fsdp1_launch_fails_in_one_line_before_anything_loads(tiny_base, alpaca_path, tmp_path):
    result = run_cli(
        CLI,
        "train",
        *_args(tiny_base, alpaca_path, tmp_path / "out", "--max_steps", "1"),
        env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("hf-lora-recipe: error: the accelerate config asks for FSDP1")
    assert "trainable" not in result.stdout and not (tmp_path / "out").exists()


def test_peft_finds_no_adapter_behind_fsdps_checkpoint_wrapper(tiny_base):
    """Why fsdp_activation_checkpointing is refused (PEFT 0.21): once torch's checkpoint_wrapper wraps the
    decoder layers, the model's state dict keys stay clean but PEFT looks the adapter up by module names, which
    now hold ``_checkpoint_wrapped_module``: it returns nothing, so every adapter-only FSDP checkpoint (and a
    full-state-dict final save) is empty. If this test fails, PEFT has fixed it and the refusal can go."""
    import functools

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=16, target_modules="all-linear")
    )
    assert len(get_peft_model_state_dict(model)) == 28
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, LlamaDecoderLayer),
    )
    assert not any("_checkpoint_wrapped_module" in key for key in model.state_dict())
    assert get_peft_model_state_dict(model) == {}


@pytest.mark.parametrize(
    "written_by, files",
    [
        ("plain", ["adapter_model.safetensors", "optimizer.pt"]),
        ("fsdp", ["pytorch_model_fsdp_0/", "optimizer_0/"]),
        ("deepspeed", ["adapter_model.safetensors", "global_step2/"]),
    ],
)
def test_a_checkpoint_resumes_only_under_the_engine_family_that_wrote_it(tmp_path, written_by, files):
    from hf_lora_recipe.distributed.engines import Engine, check_resume_engine, checkpoint_engine
    from hf_lora_recipe.recipe.schema import RecipeError

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    for name in files:
        (checkpoint / name).mkdir() if name.endswith("/") else (checkpoint / name).touch()
    assert checkpoint_engine(checkpoint) == written_by
    engines = {
        "plain": [Engine("single"), Engine("ddp")],
        "fsdp": [Engine("fsdp", 2)],
        "deepspeed": [Engine("zero2"), Engine("zero3")],
    }
    for family, members in engines.items():
        for engine in members:
            if family == written_by:
                check_resume_engine(checkpoint, engine)
            else:
                with pytest.raises(RecipeError, match=f"{checkpoint} was written by .* and this launch uses {engine}"):
                    check_resume_engine(checkpoint, engine)


@pytest.mark.slow
def test_a_ddp_checkpoint_under_fsdp_is_refused_before_loading(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    _ok(
        run_cli(
            *_launch("cpu_ddp", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "2", "--save_steps", "2"))
        )
    )
    result = run_cli(*_launch("fsdp_lora", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "4")))
    assert result.returncode != 0
    assert f"hf-lora-recipe: error: {output_dir / 'checkpoint-2'} was written by one process or DDP" in result.stderr
    assert "this launch uses FSDP2, which cannot read that optimizer state" in result.stderr
    assert "trainable:" not in result.stdout


VARIANT_FLAGS = ["--use_dora", "true", "--use_rslora", "true", "--loraplus_lr_ratio", "16", "--max_steps", "3"]
# measured: 0 for FSDP2 and ZeRO-2; ZeRO-3 3e-5 (its reduction order, ~3e-7 for plain LoRA at learning rate 1e-3,
# amplified by LoRA+'s 16x learning rate on B: 1.4e-5 with LoRA+ alone, 1.1e-6 with DoRA alone)
VARIANT_TOLERANCE = {"fsdp_lora": TOLERANCE, "deepspeed_zero2": TOLERANCE, "deepspeed_zero3": 1e-4}


@pytest.mark.slow
def test_variants_train_under_each_engine_as_in_one_process(tiny_base, alpaca_path, tmp_path, request):
    """DoRA + rsLoRA + LoRA+ sharded (FSDP2, ZeRO-3) or not (ZeRO-2): each variant's proof passes on every rank
    and the adapter is the one-process adapter (magnitude vectors included)."""
    request.getfixturevalue("deepspeed_installed")
    single = tmp_path / "one"
    _ok(run_cli(CLI, "train", *_args(tiny_base, alpaca_path, single, *LORA, *VARIANT_FLAGS)))
    reference = _adapter(single)
    assert sum("lora_magnitude_vector" in key for key in reference) == 14
    for config, tolerance in VARIANT_TOLERANCE.items():
        result = _ok(
            run_cli(*_launch(config, *_args(tiny_base, alpaca_path, tmp_path / config, *LORA, *VARIANT_FLAGS)))
        )
        assert "LoRA+: lora_B at learning_rate x 16 = 0.016, lora_A at 0.001 (checked per tensor)" in result.stdout
        difference = _max_diff(_adapter(tmp_path / config), reference)
        print(f"\n{config}: DoRA + rsLoRA + LoRA+, max |adapter difference| vs one process: {difference:.2e}")
        assert difference <= tolerance, config
        saved = json.loads((tmp_path / config / "adapter_config.json").read_text())
        assert saved["use_dora"] and saved["use_rslora"]


# ---------------------------------------------------------------- launched by train --accelerate_config


@pytest.mark.parametrize(
    "config, flags, phrase",
    [
        ("deepspeed_zero2", [], "the accelerate config asks for DeepSpeed, which is not installed here"),
        ("cpu_ddp", ["--global_batch_size", "4"], "global_batch_size 4 is not a whole multiple of"),
        ("missing", [], "--accelerate_config "),
    ],
    ids=["deepspeed-not-installed", "batch-indivisible-over-two-processes", "config-missing"],
)
def test_a_launch_checked_by_train_fails_in_one_line_before_any_process(
    config, flags, phrase, tiny_base, alpaca_path, tmp_path
):
    """The launching process checks with the launch's engine and world size: one line, exit 2, nothing started."""
    import importlib.util

    assert importlib.util.find_spec("deepspeed") is None  # the test environment has no DeepSpeed
    result = run_cli(
        CLI,
        "train",
        *_args(tiny_base, alpaca_path, tmp_path / "out", "--max_steps", "1", *flags),
        "--accelerate_config",
        str(CONFIGS / f"{config}.yaml"),
        "--num_processes",
        "2",
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("hf-lora-recipe: error: ") and phrase in result.stderr
    assert "accelerate launch" not in result.stdout and not (tmp_path / "out").exists()


@pytest.mark.slow  # two processes through accelerate launch
def test_train_with_accelerate_config_checks_then_launches_two_processes(tiny_base, alpaca_path, tmp_path):
    result = run_cli(
        CLI,
        "train",
        *_args(tiny_base, alpaca_path, tmp_path / "out", "--max_steps", "2", "--global_batch_size", "8", *LORA),
        "--accelerate_config",
        str(CONFIGS / "cpu_ddp.yaml"),
        "--num_processes",
        "2",
    )
    _ok(result)
    assert "checked for DDP on 2 processes: starting them with accelerate launch" in result.stdout
    assert "rank 1/2" in result.stdout + result.stderr and (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # two processes through accelerate launch
def test_under_accelerate_launch_a_refusal_is_printed_once(tiny_base, alpaca_path, tmp_path):
    """Every rank fails the same check; only the main process prints it (the launcher then reports the failed
    workers in its own words, which no process of ours can silence)."""
    result = subprocess.run(
        _launch(
            "cpu_ddp", *_args(tiny_base, alpaca_path, tmp_path / "out", "--max_steps", "1", "--global_batch_size", "4")
        ),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.count("hf-lora-recipe: error: global_batch_size 4 is not a whole multiple") == 1
