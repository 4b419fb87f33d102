"""CPU training throughput, side by side in one run: the seed's loop, plain TRL, and this recipe's options.

    make bench        # the tiny section (and benchmarks/preprocess.py)
    make bench-peers  # the smollm2 section, with LLaMA-Factory's venv
    .venv/bin/python benchmarks/train_throughput.py [--only tiny|smollm2] [--smollm2_halves lora qlora]

Two sections, both run by default; ``--only`` picks one.

tiny:

A Llama-architecture model (hidden 256, 4 layers, Llama-2's 32k vocabulary, random weights, NF4 base),
the real Llama-2 tokenizer and the first 96 real Alpaca rows; the seed recipe scaled down: micro-batch 4 x
accumulation 4, max_length 512, bf16 autocast, LoRA r=16/alpha 32 on all seven projections, gradient
checkpointing. Every configuration runs the same 6 optimizer steps over the same 96 examples; the table
gives supervised and total tokens/s, padding waste, and ratios to the seed's loop. Then peak RSS (NF4 vs
bf16, with and without checkpointing, each in its own process), adapter load and merge time.

smollm2 (``make bench-peers``):
The real base, SmolLM2-135M-Instruct (``materialise_smollm2()``: offline, cached under ~/.cache/hf-lora-recipe,
behind a config that says float32), on the first 64 Alpaca rows in the seed's ``[INST]`` layout, micro-batch 4 x
accumulation 2, max_length 256, LoRA r=16/alpha 32 on all seven projections, lr 3e-4, gradient checkpointing:
the seed loop, plain TRL, LLaMA-Factory 0.9.5 (its own venv, ``LLAMAFACTORY_PYTHON``) and ours, each in its own
process, in fp32 LoRA and in QLoRA (NF4 + double quant, fp32 compute), alternating the order; then ours with
sdpa's dense mask and ours in bf16. Columns: supervised tokens/s over the training span, CPU-seconds, peak RSS,
the last logged training loss, and the held-out response loss of every adapter under one evaluator.
``--rounds N`` runs every row N times, the order reversed each round, and reports medians and the median of each
round's ratios; ``--contenders`` keeps some rows (``make bench-peers BENCH_PEERS_ARGS="--smollm2_halves qlora
--rounds 3 --contenders seed llamafactory ours"``).

Results are appended to benchmarks/RESULTS.md, one table per section.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_LORA_RECIPE_SHARED", REPO_ROOT.parent / "shared"))
sys.path.insert(0, str(REPO_ROOT))
ROWS, MICRO_BATCH, ACCUMULATION, MAX_LENGTH = 96, 4, 4, 512
MEMORY_HIDDEN, MEMORY_LAYERS = 1024, 8  # big enough for weights and activations to show above the noise
# The real-base section: 3 optimizer steps per loop, ~3.5 minutes on 2 quiet CPU cores (much longer under load).
SMOLLM2_ROWS, SMOLLM2_MICRO_BATCH, SMOLLM2_ACCUMULATION, SMOLLM2_MAX_LENGTH = 64, 4, 2, 256
SMOLLM2_HELD_OUT = 32


def build_base(work: Path, hidden: int = 256, layers: int = 4) -> Path:
    from hf_lora_recipe.devtools.tiny_llama import build_tiny_llama
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "llama2"))
    return build_tiny_llama(
        tokenizer,
        work / f"base-{hidden}x{layers}",
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=int(2.6875 * hidden),
        seed=0,
    )


def recipe_for(
    base: Path,
    data: Path,
    work: Path,
    micro_batch: int = MICRO_BATCH,
    accumulation: int = ACCUMULATION,
    max_length: int = MAX_LENGTH,
    run: str = "run",
    **changes,
):
    from hf_lora_recipe.planning.estimates import BaseOnMeta
    from hf_lora_recipe.recipe.schema import Recipe

    recipe = Recipe(
        model_name_or_path=str(base),
        dataset_name=str(data),
        max_length=max_length,
        per_device_train_batch_size=micro_batch,
        global_batch_size=micro_batch * accumulation,
        output_dir=str(work / run),
        **{"num_train_epochs": 1, "logging_steps": 1000, "save_steps": 100_000, **changes},
    )
    return BaseOnMeta(recipe).resolved_recipe()  # the seed's target intent, as names on this base


def accumulation_of(recipe) -> int:
    """Gradient accumulation on one process, as the recipe derives it from global_batch_size."""
    return recipe.global_batch_size // recipe.per_device_train_batch_size


# ------------------------------------------------------------------ the seed's loop, as the seed wrote it


def seed_loop(
    recipe, rows: list[dict], tokenizer_path: Path = SHARED / "tokenizers" / "llama2", keep: bool = False
) -> dict:
    """Hand-written LoRALinear, two tokenizer calls per row, padding to the longest, a plain loop.

    Batch, accumulation and max_length come from ``recipe``; bf16 autocast only when ``recipe.bf16`` (the seed
    always used it). The EOS is the tokenizer's own, written as text as the seed wrote Llama-2's ``</s>``.
    ``keep``: the trained model comes back too (``model``).
    """
    import contextlib

    import torch
    from transformers import AutoTokenizer

    from hf_lora_recipe.model.loading import load_base_model

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Module, r: int, alpha: int, dropout: float):
            super().__init__()
            self.base, self.scale = base, alpha / r
            self.A = torch.nn.Parameter(torch.randn(r, base.in_features) / r)
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, r))
            self.dropout = torch.nn.Dropout(dropout)

        def forward(self, x):
            return self.base(x) + self.scale * (self.dropout(x) @ self.A.T @ self.B.T)

    torch.manual_seed(0)
    model = load_base_model(dataclasses.replace(recipe, attn_implementation="sdpa"))  # stock attention
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in recipe.lora_target_modules:
                if hasattr(parent, name):
                    setattr(
                        parent,
                        name,
                        LoRALinear(getattr(parent, name), recipe.lora_r, recipe.lora_alpha, recipe.lora_dropout),
                    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    micro_batch, accumulation, max_length = (
        recipe.per_device_train_batch_size,
        accumulation_of(recipe),
        recipe.max_length,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, betas=(0.9, 0.999), weight_decay=0.0)

    started, cpu_started = time.perf_counter(), time.process_time()
    examples = []
    for row in rows:
        user = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        prompt = f"[INST] {user} [/INST]"
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(f"{prompt} {row['output']} {tokenizer.eos_token}")["input_ids"][:max_length]
        examples.append((full_ids, ([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])[:max_length]))
    positions = tokens = supervised = steps = 0
    batches = [examples[i : i + micro_batch] for i in range(0, len(examples), micro_batch)]
    train_started, train_cpu_started = time.perf_counter(), time.process_time()
    for step in range(0, len(batches), accumulation):
        step_loss = 0.0
        for batch in batches[step : step + accumulation]:
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16) if recipe.bf16 else contextlib.nullcontext():
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss / accumulation
            loss.backward()
            step_loss += loss.item()
            positions += input_ids.numel()
            tokens += int(mask.sum())
            supervised += int((labels[:, 1:] != -100).sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    figures = {
        "seconds": time.perf_counter() - started,
        "positions": positions,
        "tokens": tokens,
        "supervised": supervised,
        "steps": steps,
        "cpu_seconds": time.process_time() - cpu_started,
        "train_seconds": time.perf_counter() - train_started,
        "train_cpu_seconds": time.process_time() - train_cpu_started,
        "last_logged_loss": step_loss,
    }
    if keep:
        figures["model"] = model
    return figures


# ------------------------------------------------------------------ TRL, plain and ours


def metered():
    """A TrainerCallback timing the training span (wall and this process's CPU) and counting, at the model's own
    forward, the positions, real tokens and supervised targets each step trains on; works with any HF Trainer
    (TRL's, LLaMA-Factory's, ours), so every contender is counted the same way."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.figures = {"positions": 0, "tokens": 0, "supervised": 0}

        def _count(self, module, args, kwargs):
            ids, labels, mask = kwargs.get("input_ids"), kwargs.get("labels"), kwargs.get("attention_mask")
            if ids is not None and labels is not None and module.training:
                self.figures["positions"] += ids.numel()
                self.figures["tokens"] += int(mask.sum()) if mask is not None else ids.numel()
                self.figures["supervised"] += int((labels[:, 1:] != -100).sum())

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.figures["last_logged_loss"] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            self.figures.update(
                seconds=time.perf_counter() - self.started,
                cpu_seconds=time.process_time() - self.cpu_started,
                steps=state.global_step,
            )

    return Meter()


def plain_trl(recipe, rows: list[dict], tokenizer_path: Path = SHARED / "tokenizers" / "llama2") -> dict:
    """SFTTrainer with its defaults and the same LoRA settings, on prompt/completion rows in the seed format
    (TRL appends the tokenizer's EOS to each completion)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.loading import load_base_model

    torch.manual_seed(0)
    dataset = Dataset.from_list(
        [
            {
                "prompt": f"[INST] {r['instruction']}" + (f"\n{r['input']}" if r["input"] else "") + " [/INST]",
                "completion": f" {r['output']}",
            }
            for r in rows
        ]
    )
    args = SFTConfig(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation_of(recipe),
        num_train_epochs=1,
        learning_rate=recipe.learning_rate,
        max_length=recipe.max_length,
        bf16=recipe.bf16,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=recipe.logging_steps,
        disable_tqdm=True,
        gradient_checkpointing=recipe.gradient_checkpointing,
    )
    meter = metered()
    trainer = SFTTrainer(
        model=load_base_model(dataclasses.replace(recipe, attn_implementation="sdpa")),
        args=args,
        train_dataset=dataset,
        peft_config=lora_config(recipe),
        processing_class=AutoTokenizer.from_pretrained(tokenizer_path),
        callbacks=[meter],
    )
    trainer.train()
    trainer.save_model(recipe.output_dir)
    return meter.figures


def ours(recipe) -> dict:
    """This recipe's trainer; ``seconds``/``cpu_seconds`` include its data step, ``train_seconds``/
    ``train_cpu_seconds`` are the training span alone."""
    import torch

    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.templates.tokenizer import tokenizer_for
    from hf_lora_recipe.training.trainer import RecipeTrainer, trainer_config, uses_fused_loss

    torch.manual_seed(0)
    tokenizer = tokenizer_for(recipe)
    started, cpu_started = time.perf_counter(), time.process_time()
    dataset, _ = build_sft_dataset(recipe, tokenizer)
    preprocessing, cpu_preprocessing = time.perf_counter() - started, time.process_time() - cpu_started
    args = trainer_config(recipe, accumulation_of(recipe))
    args.save_strategy, args.disable_tqdm = "no", True
    meter = metered()
    trainer = RecipeTrainer(
        model=add_adapter(load_base_model(recipe), recipe),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        fused_loss=uses_fused_loss(recipe.lm_head_loss),
        callbacks=[meter],
    )
    trainer.train()
    trainer.save_model(recipe.output_dir)
    figures = dict(
        meter.figures, train_seconds=meter.figures["seconds"], train_cpu_seconds=meter.figures["cpu_seconds"]
    )
    figures["seconds"] += preprocessing
    figures["cpu_seconds"] += cpu_preprocessing
    return figures


# ------------------------------------------------------------------ memory, load, merge


def peak_rss_child(argv: list[str]) -> int:
    """Peak resident memory of a fresh process doing one configuration (its own ru_maxrss, in bytes)."""
    done = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


def memory_status(field: str) -> int:
    """A byte figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: its peak since exec,
    where wait4's ru_maxrss would keep the parent's peak from before the fork as a floor); elsewhere the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    return memory_status("VmRSS")


def memory_child(base: str, data: str, work: str, quantized: str, checkpointing: str) -> None:
    """Peak resident memory while loading and training, above the process's resident memory before that
    (imports and libraries' own pools, several GB and the same for every configuration, would hide it)."""
    import threading

    recipe = recipe_for(
        Path(base),
        Path(data),
        Path(work),
        load_in_4bit=quantized == "1",
        gradient_checkpointing=checkpointing == "1",
        max_steps=2,
    )
    import torch  # noqa: F401 - imported before the baseline is taken
    import trl  # noqa: F401

    baseline, peak, running = current_rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ours(recipe)
    running[0] = False
    sampler.join()
    print(peak[0] - baseline)


def append_results(lines: list[str]) -> None:
    table = "\n".join(lines)
    print(table)
    with open(REPO_ROOT / "benchmarks" / "RESULTS.md", "a") as out:
        out.write(table + "\n")


def alpaca_rows(work: Path, count: int, name: str = "rows.json") -> tuple[list[dict], Path]:
    """The first ``count`` real Alpaca rows, and a JSON file of them for the recipe's data step."""
    rows = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())[:count]
    data = work / name
    data.write_text(json.dumps(rows))
    return rows, data


def tiny_section(work: Path) -> None:
    """The side-by-side on a tiny random Llama (module docstring), then memory, adapter load and merge."""
    import torch
    import transformers
    import trl

    rows, data = alpaca_rows(work, ROWS)
    base = build_base(work)
    results: dict[str, dict] = {}

    def measure(name: str, function, *args) -> None:
        results[name] = function(*args)
        r = results[name]
        print(f"{name}: {r['supervised'] / r['seconds']:,.0f} supervised tokens/s", flush=True)

    measure("seed loop (hand-written LoRALinear, padded)", seed_loop, recipe_for(base, data, work), rows)
    measure("plain TRL SFTTrainer, defaults", plain_trl, recipe_for(base, data, work), rows)
    measure("ours, default (CPU: padding-free, plain loss)", ours, recipe_for(base, data, work))
    measure("ours, padded", ours, recipe_for(base, data, work, padding_free="false"))
    measure(
        "ours, padded, length-grouped batches",
        ours,
        recipe_for(base, data, work, padding_free="false", train_sampling_strategy="group_by_length"),
    )
    measure("ours, padding-free, TRL fused loss", ours, recipe_for(base, data, work, lm_head_loss="fused"))

    baseline = results["seed loop (hand-written LoRALinear, padded)"]
    lines = [
        f"### CPU training throughput, {datetime.date.today()} - {ROWS} Alpaca rows, micro-batch {MICRO_BATCH} x "
        f"accumulation {ACCUMULATION}, max_length {MAX_LENGTH}, NF4, LoRA r=16 x 7, checkpointing, bf16 autocast",
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl.__version__}; model hidden 256 x 4 layers, vocab 32,000",
        "",
        "| configuration | supervised tok/s | total tok/s | padding waste | vs seed loop (supervised tok/s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        waste = 1 - r["tokens"] / r["positions"]
        ratio = (r["supervised"] / r["seconds"]) / (baseline["supervised"] / baseline["seconds"])
        lines.append(
            f"| {name} | {r['supervised'] / r['seconds']:,.0f} | {r['tokens'] / r['seconds']:,.0f} | "
            f"{waste:.1%} | {ratio:.2f}x |"
        )

    lines += [
        "",
        f"| peak RSS above the idle process (hidden {MEMORY_HIDDEN} x {MEMORY_LAYERS} layers, 2 steps, ours default) "
        "| MiB | vs NF4 + checkpointing |",
        "|---|---|---|",
    ]
    rss = {}
    memory_base = build_base(work, MEMORY_HIDDEN, MEMORY_LAYERS)
    for label, quantized, checkpointing in (
        ("NF4, checkpointing", "1", "1"),
        ("NF4, no checkpointing", "1", "0"),
        ("bf16, checkpointing", "0", "1"),
        ("bf16, no checkpointing", "0", "0"),
    ):
        peak = peak_rss_child(
            [
                "--memory-child",
                str(memory_base),
                str(data),
                str(work / f"mem-{quantized}{checkpointing}"),
                quantized,
                checkpointing,
            ]
        )
        rss[label] = peak
        print(f"{label}: {peak / 2**20:,.0f} MiB", flush=True)
    for label, peak in rss.items():
        lines.append(f"| {label} | {peak / 2**20:,.0f} | {peak / rss['NF4, checkpointing']:.2f}x |")

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.shipping.merging import merge

    adapter = Path(recipe_for(base, data, work).output_dir)
    started = time.perf_counter()
    plain = AutoModelForCausalLM.from_pretrained(base)
    base_load = time.perf_counter() - started
    started = time.perf_counter()
    PeftModel.from_pretrained(plain, adapter)
    adapter_load = time.perf_counter() - started
    started = time.perf_counter()
    merge(str(adapter), work / "merged")
    merge_seconds = time.perf_counter() - started
    lines += [
        "",
        f"adapter load {adapter_load:.2f} s ({adapter_load / base_load:.2f}x the base's own load); "
        f"merge into dequantized NF4 and write {merge_seconds:.2f} s ({merge_seconds / base_load:.1f}x the base load)",
        "",
    ]
    append_results(lines)


# ------------------------------------------------------------------ the real base: seed loop, peers and ours


def save_seed_adapter(model, recipe, output_dir: Path) -> None:
    """The seed loop's hand-written A and B as a PEFT adapter folder (same names PEFT gives them), so one
    evaluator scores every contender's adapter."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors = {}
    for name, module in model.named_modules():
        if hasattr(module, "A") and hasattr(module, "B"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.A.detach().float().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.B.detach().float().contiguous()
    config = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        target_modules=sorted({key.split(".")[-3] for key in tensors}),
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(output_dir)
    save_file(tensors, output_dir / "adapter_model.safetensors")


def llamafactory_child(job: dict) -> dict:
    """LLaMA-Factory 0.9.5 (its own venv; ``make bench-peers`` builds it) on the same rows and settings: its
    alpaca reader, its ``llama2`` template (``<s>[INST] {instruction}\n{input} [/INST]{output}</s>``), its
    defaults otherwise (reentrant checkpointing, padded batches)."""
    from llamafactory.train.tuner import run_exp

    data = Path(job["rows"])
    (data.parent / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": data.name}}))
    meter = metered()
    arguments = dict(
        model_name_or_path=job["base"],
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        lora_target="all",
        lora_rank=job["lora_r"],
        lora_alpha=job["lora_alpha"],
        lora_dropout=job["lora_dropout"],
        dataset="bench",
        dataset_dir=str(data.parent),
        template="llama2",
        cutoff_len=job["max_length"],
        overwrite_cache=True,
        output_dir=job["output_dir"],
        overwrite_output_dir=True,
        per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=job["accumulation"],
        learning_rate=job["learning_rate"],
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        bf16=job["bf16"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    if job["quantized"]:
        arguments.update(quantization_bit=4, quantization_type="nf4", double_quantization=True)
    run_exp(arguments, callbacks=[meter])
    return meter.figures


def peer_child(contender: str, job_file: str) -> None:
    """One contender's run in this fresh process (its peak RSS is the parent's to read); figures to stdout."""
    job = json.loads(Path(job_file).read_text())
    if contender == "llamafactory":
        figures = llamafactory_child(job)
    else:
        from hf_lora_recipe.recipe.schema import Recipe

        recipe = Recipe(**job["recipe"])
        rows = json.loads(Path(job["rows"]).read_text())
        if contender == "seed":
            figures = seed_loop(recipe, rows, tokenizer_path=Path(recipe.model_name_or_path), keep=True)
            save_seed_adapter(figures.pop("model"), recipe, Path(recipe.output_dir))
            figures["seconds"], figures["cpu_seconds"] = figures.pop("train_seconds"), figures.pop("train_cpu_seconds")
        elif contender == "trl":
            figures = plain_trl(recipe, rows, tokenizer_path=Path(recipe.model_name_or_path))
        else:
            figures = ours(recipe)
            figures["seconds"], figures["cpu_seconds"] = figures.pop("train_seconds"), figures.pop("train_cpu_seconds")
    figures["peak_rss"] = memory_status("VmHWM")
    print("FIGURES " + json.dumps(figures), flush=True)


def run_child(python: str, contender: str, job: dict, work: Path) -> dict:
    """Run one contender in its own process; its figures (peak resident memory included)."""
    job_file = work / f"{contender}-{Path(job['output_dir']).name}.json"
    job_file.write_text(json.dumps(job))
    log_file = work / f"{job_file.stem}.log"
    with open(log_file, "w") as log:
        child = subprocess.Popen(
            [python, __file__, "--peer-child", contender, str(job_file)], stdout=log, stderr=subprocess.STDOUT
        )
        status = child.wait()
    output = log_file.read_text()
    if status != 0 or "FIGURES " not in output:
        tail = output.strip().splitlines()[-1] if output.strip() else "no output"
        return {"failed": tail[:160]}
    return json.loads(output.rsplit("FIGURES ", 1)[1].splitlines()[0])


def float32_base(base: Path, work: Path) -> Path:
    """The same weights behind a config that says float32: LLaMA-Factory keeps a bf16-config base in bf16 even
    with ``bf16: false``; every contender loads this copy, so fp32 means fp32 for all."""
    copy = work / f"{base.name}-fp32-config"
    copy.mkdir(exist_ok=True)
    for item in base.iterdir():
        if item.name != "config.json" and not (copy / item.name).exists():
            (copy / item.name).symlink_to(item.resolve())
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def held_out_loss(recipe, adapter: Path, held_out: list[dict]) -> float:
    """Mean response-token loss of ``adapter`` on the held-out rows, rendered by this recipe's template and
    scored on the base as that adapter trained on it: one evaluator for every contender."""
    from hf_lora_recipe.evaluation.scoring import examples_for, load_adapter, response_loss
    from hf_lora_recipe.templates.tokenizer import tokenizer_for

    tokenizer = tokenizer_for(recipe)
    examples = examples_for(recipe, tokenizer, held_out)
    model = load_adapter(recipe, adapter)
    loss, _ = response_loss(model, examples, tokenizer.pad_token_id, batch_size=8, progress=False)
    return loss


PEERS = (
    ("seed", "seed loop (hand-written LoRALinear, padded)"),
    ("trl", "plain TRL SFTTrainer (padded)"),
    ("llamafactory", "LLaMA-Factory 0.9.5 (padded)"),
    ("ours", "ours, default"),
)


SMOLLM2_CONTENDERS = [contender for contender, _ in PEERS] + ["ours-sdpa", "ours-bf16"]
SMOLLM2_HALVES = {"lora": ("LoRA, fp32", False), "qlora": ("QLoRA NF4 + double quant, fp32 compute", True)}


def speed_of(figures: dict) -> float:
    """Supervised tokens per second over the training span."""
    return figures["supervised"] / figures["seconds"]


def ratio_to(reference: list[dict] | None, speeds: list[float]) -> str:
    """The median over rounds of a speed over the reference's speed in the same round ("n/a" without one)."""
    if not reference or any("failed" in f for f in reference):
        return "n/a"
    return f"{statistics.median(v / speed_of(f) for v, f in zip(speeds, reference)):.2f}x"


def best_peer_runs(results: dict[str, list[dict]]) -> list[dict] | None:
    """Per round, the faster of plain TRL and LLaMA-Factory (of those that ran)."""
    peers = [results[label] for label in (PEERS[1][1], PEERS[2][1]) if label in results]
    peers = [runs for runs in peers if not any("failed" in f for f in runs)]
    return [max(round_, key=speed_of) for round_ in zip(*peers)] if peers else None


def smollm2_section(
    work: Path, halves: tuple[str, ...] = tuple(SMOLLM2_HALVES), rounds: int = 1, contenders: list[str] | None = None
) -> None:
    """The seed loop, plain TRL, LLaMA-Factory and ours on the real SmolLM2-135M-Instruct base (module docstring)."""
    import torch
    import transformers

    from hf_lora_recipe.devtools.real_base import materialise_smollm2
    from hf_lora_recipe.training.trainer import cpu_has_native_bf16

    # a CPU without bf16 hardware emulates its matmuls (docs/speed.md): such a row would measure the emulation
    bf16_rows = cpu_has_native_bf16() is not False

    base = float32_base(materialise_smollm2(), work)
    everything = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())
    rows, held_out = everything[:SMOLLM2_ROWS], everything[SMOLLM2_ROWS : SMOLLM2_ROWS + SMOLLM2_HELD_OUT]
    data = work / "smollm2" / "rows.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(rows))
    llamafactory_python = os.environ.get("LLAMAFACTORY_PYTHON", str(REPO_ROOT / ".venv-llamafactory/bin/python"))

    def job(run: str, quantized: bool, bf16: bool, **changes) -> dict:
        recipe = recipe_for(
            base,
            data,
            work,
            micro_batch=SMOLLM2_MICRO_BATCH,
            accumulation=SMOLLM2_ACCUMULATION,
            max_length=SMOLLM2_MAX_LENGTH,
            run=run,
            load_in_4bit=quantized,
            bnb_4bit_compute_dtype="bfloat16" if bf16 else "float32",
            bf16=bf16,
            chat_template="llama2",
            gradient_checkpointing=True,
            logging_steps=1,
            **changes,
        )
        return {
            "recipe": {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)},
            "rows": str(data),
            "base": str(base),
            "output_dir": recipe.output_dir,
            "quantized": quantized,
            "bf16": bf16,
            "micro_batch": SMOLLM2_MICRO_BATCH,
            "accumulation": SMOLLM2_ACCUMULATION,
            "max_length": SMOLLM2_MAX_LENGTH,
            "learning_rate": recipe.learning_rate,
            "lora_r": recipe.lora_r,
            "lora_alpha": recipe.lora_alpha,
            "lora_dropout": recipe.lora_dropout,
        }

    sections = []
    for half in halves:
        index = list(SMOLLM2_HALVES).index(half)
        title, quantized = SMOLLM2_HALVES[half]
        results: dict[str, list[dict]] = {}
        for round_ in range(rounds):
            # alternating, by table and by round: no contender always runs first
            order = PEERS if (index + round_) % 2 == 0 else PEERS[::-1]
            suffix = f"{index}" if rounds == 1 else f"{index}-round{round_}"
            runs = [(label, contender, job(f"{contender}-{suffix}", quantized, False)) for contender, label in order]
            runs.append(
                (
                    "ours, attn_implementation sdpa (dense mask over the pack)",
                    "ours-sdpa",
                    job(f"ours-sdpa-{suffix}", quantized, False, attn_implementation="sdpa"),
                )
            )
            if bf16_rows:
                runs.append(
                    (
                        "ours, bf16 (autocast" + (", bf16 compute)" if quantized else ")"),
                        "ours-bf16",
                        job(f"ours-bf16-{suffix}", quantized, True),
                    )
                )
            for label, contender, spec in runs:
                if contenders is not None and contender not in contenders:
                    continue
                python = llamafactory_python if contender == "llamafactory" else sys.executable
                if contender == "llamafactory" and not Path(python).exists():
                    figures = {"failed": f"no LLaMA-Factory venv at {python} (make bench-peers builds it)"}
                else:
                    figures = run_child(python, contender.split("-")[0], spec, work)
                if "failed" not in figures and round_ == 0:  # the same steps on the same rows: one evaluation
                    from hf_lora_recipe.recipe.schema import Recipe

                    recipe = Recipe(**spec["recipe"])
                    figures["held_out_loss"] = held_out_loss(recipe, Path(spec["output_dir"]), held_out)
                print(f"SmolLM2 {title} | round {round_} | {label}: {json.dumps(figures)}", flush=True)
                results.setdefault(label, []).append(figures)
        sections.append((title, results))

    config = json.loads((base / "config.json").read_text())
    steps = SMOLLM2_ROWS // (SMOLLM2_MICRO_BATCH * SMOLLM2_ACCUMULATION)
    lines = [
        f"### CPU training, real base, seed loop vs peers vs ours, {datetime.date.today()} - SmolLM2-135M-Instruct, "
        f"first {SMOLLM2_ROWS} Alpaca rows, micro-batch {SMOLLM2_MICRO_BATCH} x accumulation {SMOLLM2_ACCUMULATION}, "
        f"max_length {SMOLLM2_MAX_LENGTH}, {steps} optimizer steps each, LoRA r=16/alpha 32 x 7, dropout 0.05, "
        "lr 3e-4, gradient checkpointing, [INST] layout",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; base hidden {config['hidden_size']} x "
        f"{config['num_hidden_layers']} layers, vocab {config['vocab_size']:,} (a float32-config copy of the "
        "dequantized Q4_1 weights)",
        "Each run in its own process, in the order listed (the second table in reverse for the four contenders). "
        "Seconds and CPU-seconds: the training span (first step to last), model loading and tokenization "
        "excluded; supervised tokens counted at the model's forward for every trainer; peak RSS: the whole "
        f"process; held-out loss: one evaluator (this recipe's template and scoring) over {SMOLLM2_HELD_OUT} "
        "held-out rows for every adapter.",
    ]
    if not bf16_rows:
        lines.append("No bf16 row: this CPU has no AVX512-BF16, AMX or Arm BF16, so torch emulates bf16 matmuls.")
    if rounds > 1:
        lines.append(
            f"{rounds} rounds, the order reversed each round. Supervised tok/s: the median, then each round's; the "
            "ratios: the median of each round's ratio (contenders measured minutes apart share the machine's load); "
            "CPU-seconds: the median; peak RSS: the largest; losses: the first round's."
        )
    for title, results in sections:
        lines += [
            "",
            f"{title}:",
            "",
            "| configuration | supervised tok/s | vs seed loop | vs best peer | CPU-seconds | supervised tok per CPU-s "
            "| padding waste | peak RSS MiB | last logged train loss | held-out loss |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for label, runs in results.items():
            failed = next((f["failed"] for f in runs if "failed" in f), None)
            if failed:
                lines.append(f"| {label} | failed: {failed} | | | | | | | | |")
                continue
            speeds = [speed_of(f) for f in runs]
            each = f" ({', '.join(f'{v:,.1f}' for v in speeds)})" if rounds > 1 else ""
            seed_ratio = ratio_to(results.get(PEERS[0][1]), speeds)
            peer_ratio = ratio_to(best_peer_runs(results), speeds)
            first, cpu = runs[0], statistics.median(f["cpu_seconds"] for f in runs)
            lines.append(
                f"| {label} | {statistics.median(speeds):,.1f}{each} | {seed_ratio} | {peer_ratio} | {cpu:.1f} | "
                f"{sum(f['supervised'] for f in runs) / sum(f['cpu_seconds'] for f in runs):,.1f} | "
                f"{1 - first['tokens'] / first['positions']:.1%} | {max(f['peak_rss'] for f in runs) / 2**20:,.0f} | "
                f"{first.get('last_logged_loss', float('nan')):.4f} | {first.get('held_out_loss', float('nan')):.4f} |"
            )
    lines.append("")
    append_results(lines)


SECTIONS = {"tiny": tiny_section, "smollm2": smollm2_section}


def main() -> int:
    if sys.argv[1:2] == ["--memory-child"]:
        memory_child(*sys.argv[2:])
        return 0
    if sys.argv[1:2] == ["--peer-child"]:
        peer_child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), help="run one section (default: all of them, in order)")
    parser.add_argument(
        "--smollm2_halves",
        nargs="+",
        choices=list(SMOLLM2_HALVES),
        default=list(SMOLLM2_HALVES),
        help="which of the smollm2 section's tables to run (default: both)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="smollm2: run every row this many times (medians, per-round ratios)"
    )
    parser.add_argument(
        "--contenders", nargs="+", choices=SMOLLM2_CONTENDERS, help="smollm2: only these rows (default: all)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give 1 or more")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = time.perf_counter()
    for name, section in SECTIONS.items():
        if args.only not in (None, name):
            continue
        if name == "smollm2":
            section(work, args.smollm2_halves, args.rounds, args.contenders)
        else:
            section(work)
    print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
