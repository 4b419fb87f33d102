"""Scale out and survive: real processes, real signals, real checkpoints (CPU, gloo)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import ACCELERATE, CLI, REPO_ROOT, run_cli


CPU_DDP = str(REPO_ROOT / "accelerate_configs" / "cpu_ddp.yaml")


def _args(tiny_base: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(tiny_base),
        "--dataset_name",
        str(data),
        "--max_length",
        "64",
        "--lora_dropout",
        "0",
        "--load_in_4bit",
        "false",
        "--bf16",
        "false",
        "--learning_rate",
        "1e-3",
        "--global_batch_size",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_TOLERANCE = 1e-5  # fp32; the same examples per optimizer step, gradients averaged by DDP vs accumulated


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_base, alpaca_path, tmp_path):
    single = run_cli(CLI, "train", *_args(tiny_base, alpaca_path, tmp_path / "one", "--max_steps", "3"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(
        ACCELERATE,
        "launch",
        "--config_file",
        CPU_DDP,
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_lora_recipe.train",
        *_args(tiny_base, alpaca_path, tmp_path / "two", "--max_steps", "3"),
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "world size 2 x micro-batch 4 x gradient accumulation 1 = global batch 8" in ddp.stdout
    ranks = dict(re.findall(r"rank (\d)/2\] consumed 12 examples, data digest (\w+)", ddp.stdout))
    assert set(ranks) == {"0", "1"} and ranks["0"] != ranks["1"]  # each rank read its own share
    assert "rank 0/1] consumed 24 examples" in single.stdout
    assert ddp.stdout.count("adapter written to") == 1  # only the main process writes
    assert yaml.safe_load((tmp_path / "two" / "recipe.yaml").read_text())["derived"] == {
        "gradient_accumulation_steps": 1,
        "world_size": 2,
        "engine": "DDP",
    }
    difference = _max_diff(_adapter(tmp_path / "one"), _adapter(tmp_path / "two"))
    print(f"\nmax |adapter difference| 1 process vs 2 processes: {difference:.2e}")
    assert difference < DDP_TOLERANCE


@pytest.mark.slow
def test_indivisible_batch_for_the_launch_fails_before_loading(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_cli(
        ACCELERATE,
        "launch",
        "--config_file",
        CPU_DDP,
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_lora_recipe.train",
        *_args(tiny_base, alpaca_path, output_dir, "--global_batch_size", "12"),
    )
    assert result.returncode != 0 and "not a whole multiple" in result.stderr
    assert "Loading weights" not in result.stderr and not output_dir.exists()


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny_base, alpaca_path, tmp_path):
    port = str(_free_port())
    commands = [
        [
            ACCELERATE,
            "launch",
            "--config_file",
            CPU_DDP,
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "hf_lora_recipe.train",
            *_args(tiny_base, alpaca_path, tmp_path / "adapter", "--max_steps", "2"),
        ]
        for rank in (0, 1)
    ]
    nodes = [
        subprocess.Popen(c, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "world size 2" in outputs[0][0] and "adapter written to" in outputs[0][0]
    assert "rank 1/2] consumed 8 examples" in outputs[1][0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_accumulation_equals_a_bigger_batch(tiny_base, alpaca_path, tmp_path):
    """4 x 1 vs 2 x 2 on the same examples of unequal lengths: the loss is normalised by supervised tokens
    across the accumulated micro-batches, so the gradients agree (a mean of per-micro-batch means would not)."""
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.templates.tokenizer import load_tokenizer
    from hf_lora_recipe.training.trainer import trainer_config

    recipe = Recipe(
        model_name_or_path=str(tiny_base),
        dataset_name=str(alpaca_path),
        max_length=64,
        lora_dropout=0.0,
        load_in_4bit=False,
        bf16=False,
        max_grad_norm=1e9,
        max_steps=1,
        output_dir=str(tmp_path),
    )
    tokenizer = load_tokenizer(str(tiny_base))
    dataset, _ = build_sft_dataset(recipe, tokenizer)

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grads = []
    for micro_batch, accumulation in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = add_adapter(
            AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
            Recipe(**{**recipe.__dict__, "gradient_checkpointing": False}),
        )
        config = trainer_config(
            Recipe(**{**recipe.__dict__, "per_device_train_batch_size": micro_batch}), accumulation
        )
        capture = Capture()
        SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[capture]
        ).train()
        grads.append(capture.grads)
    lengths = [sum(1 for y in labels if y != -100) for labels in dataset.select(range(8))["labels"]]
    assert len(set(lengths)) > 1  # unequal numbers of supervised tokens
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before the expected moment")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_adapter(tiny_base, alpaca_path, tmp_path):
    steps = ["--max_steps", "8", "--save_steps", "2", "--max_length", "128"]
    reference = run_cli(CLI, "train", *_args(tiny_base, alpaca_path, tmp_path / "reference", *steps))
    assert reference.returncode == 0, reference.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    command = [CLI, "train", *_args(tiny_base, alpaca_path, interrupted, *steps)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (interrupted / "checkpoint-4" / "hf_lora_recipe.json").is_file(), process)  # complete
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "adapter_model.safetensors").exists()  # nothing that looks like a finished adapter
    checkpoint = interrupted / "checkpoint-4"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert not [p for p in checkpoint.iterdir() if p.name == "model.safetensors"]  # never the frozen base

    resumed = run_cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resuming from \S*checkpoint-(4|6)", resumed.stdout)
    difference = _max_diff(_adapter(tmp_path / "reference"), _adapter(interrupted))
    print(f"\nmax |adapter difference| uninterrupted vs killed-and-resumed: {difference:.2e}")
    assert difference < 1e-6
    assert len(list(interrupted.glob("checkpoint-*"))) <= 2  # save_total_limit


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_base, alpaca_path, tmp_path, capsys):
    from hf_lora_recipe.commands.train import main as train_main

    output_dir = tmp_path / "adapter"
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:  # in-process: the run installs its SIGTERM/SIGINT handlers here
        code = train_main(
            _args(
                tiny_base,
                alpaca_path,
                output_dir,
                "--learning_rate",
                "1e30",
                "--bf16",
                "true",
                "--max_steps",
                "4",
                "--save_steps",
                "1",
            )
        )
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "Traceback" not in err
    match = re.search(r"non-finite loss or gradient at step (\d+).*Last good checkpoint: (\S+) \(kept\)", err)
    assert match, err[-3000:]
    step, checkpoint = int(match.group(1)), Path(match.group(2))
    assert checkpoint.name == f"checkpoint-{step - 1}" and (checkpoint / "adapter_model.safetensors").is_file()
    assert all(torch.isfinite(t).all() for t in _adapter(checkpoint).values())
    assert not (output_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_cleanly_and_the_rerun_resumes(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    command = [CLI, "train", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "200", "--save_steps", "1000")]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged = []

    def second_step_logged() -> bool:
        line = process.stdout.readline()
        logged.append(line)
        return line.count("'loss'") > 0 and len([l for l in logged if "'loss'" in l]) >= 2

    _wait_for(second_step_logged, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    match = re.search(r"stopped by signal 15 at step (\d+); checkpoint saved at (\S+);", err)
    assert match, err[-3000:]
    checkpoint = Path(match.group(2))
    assert checkpoint.name == f"checkpoint-{match.group(1)}" and (checkpoint / "optimizer.pt").is_file()
    assert not (output_dir / "adapter_model.safetensors").exists()

    step = int(match.group(1))
    rerun = run_cli(*command[:-4], "--max_steps", str(step + 1), "--save_steps", "1000")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {checkpoint}" in rerun.stdout
    assert (output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_at_another_world_size_rederives_accumulation(tiny_base, alpaca_path, tmp_path):
    output_dir = tmp_path / "adapter"
    first = run_cli(CLI, "train", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "2", "--save_steps", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(
        ACCELERATE,
        "launch",
        "--config_file",
        CPU_DDP,
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "hf_lora_recipe.train",
        *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "3"),
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "world size 1 -> 2: gradient accumulation re-derived 2 -> 1, global batch unchanged" in second.stdout
    fresh = run_cli(
        CLI, "train", *_args(tiny_base, alpaca_path, output_dir, "--max_steps", "1", "--overwrite_output_dir", "true")
    )
    assert fresh.returncode == 0 and "resuming" not in fresh.stdout


def test_every_accelerate_config_parses_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {
        "single_gpu",
        "multi_gpu",
        "fsdp_qlora",
        "fsdp_lora",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "multi_node",
        "cpu_ddp",
    } <= names
    for path in files:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1 and path.read_text().startswith("#")
        assert "accelerate launch" in path.read_text()  # the header gives the launch line
        assert config.mixed_precision == "no"  # precision is the recipe's bf16 key, not the launcher's
    assert (REPO_ROOT / "recipes" / "launch.slurm").read_text().startswith("#!/bin/bash")


def test_an_empty_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    from hf_lora_recipe.recipe.schema import Recipe
    from hf_lora_recipe.training.checkpoints import check_saved_adapter

    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(0)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="shape"):
        check_saved_adapter(tmp_path, Recipe(), trained_steps=3)
    save_file(
        {"a.lora_A.weight": torch.ones(16, 8), "a.lora_B.weight": torch.zeros(8, 16)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(RuntimeError, match="every lora_B is zero"):
        check_saved_adapter(tmp_path, Recipe(), trained_steps=3)
    check_saved_adapter(tmp_path, Recipe(), trained_steps=0)  # step 0: B = 0 is right
