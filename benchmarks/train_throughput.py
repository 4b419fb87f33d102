"""CPU training throughput, side by side in one run: the seed's loop, plain TRL, and this recipe's options.

    make bench        # or: .venv/bin/python benchmarks/train_throughput.py [--only tiny|smollm2]

Two sections, both run by default; ``--only`` picks one.

tiny:

A Llama-architecture model (hidden 256, 4 layers, Llama-2's 32k vocabulary, random weights, NF4 base),
the real Llama-2 tokenizer and the first 96 real Alpaca rows; the seed recipe scaled down: micro-batch 4 x
accumulation 4, max_length 512, bf16 autocast, LoRA r=16/alpha 32 on all seven projections, gradient
checkpointing. Every configuration runs the same 6 optimizer steps over the same 96 examples; the table
gives supervised and total tokens/s, padding waste, and ratios to the seed's loop. Then peak RSS (NF4 vs
bf16, with and without checkpointing, each in its own process), adapter load and merge time.

smollm2:
The same side-by-side on the real base, SmolLM2-135M-Instruct (``materialise_smollm2()``: offline, cached
under ~/.cache/hf-lora-recipe), seed loop vs ours: QLoRA NF4 as the recipe's defaults except
``bnb_4bit_compute_dtype: float32`` and ``bf16: false`` for both loops - a CPU without fast bf16 matmuls runs
NF4 with bf16 compute and autocast ~30x slower than with fp32 (measured: ~130 s vs ~4 s per 256 tokens of
forward+backward). The first 24 Alpaca rows, micro-batch 4 x accumulation 2, max_length 256, so 3 optimizer
steps each; LoRA r=16/alpha 32 on all seven projections, gradient checkpointing, the llama2 template (the seed
renders ``[INST]``). The table gives supervised tokens per wall-clock second and the ratio to the seed loop,
and, because the machine may be shared, supervised tokens per CPU-second of this process (less sensitive to
other processes) and the 1-minute load average around each loop: compare within one run.

Results are appended to benchmarks/RESULTS.md, one table per section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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
SMOLLM2_ROWS, SMOLLM2_MICRO_BATCH, SMOLLM2_ACCUMULATION, SMOLLM2_MAX_LENGTH = 24, 4, 2, 256


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
    from hf_lora_recipe.recipe.schema import Recipe

    return Recipe(
        model_name_or_path=str(base),
        dataset_name=str(data),
        max_length=max_length,
        per_device_train_batch_size=micro_batch,
        global_batch_size=micro_batch * accumulation,
        num_train_epochs=1,
        logging_steps=1000,
        save_steps=100_000,
        output_dir=str(work / run),
        **changes,
    )


def accumulation_of(recipe) -> int:
    """Gradient accumulation on one process, as the recipe derives it from global_batch_size."""
    return recipe.global_batch_size // recipe.per_device_train_batch_size


# ------------------------------------------------------------------ the seed's loop, as the seed wrote it


def seed_loop(recipe, rows: list[dict], tokenizer_path: Path = SHARED / "tokenizers" / "llama2") -> dict:
    """Hand-written LoRALinear, two tokenizer calls per row, padding to the longest, a plain loop.

    Batch, accumulation and max_length come from ``recipe``; bf16 autocast only when ``recipe.bf16`` (the seed
    always used it). The EOS is the tokenizer's own, written as text as the seed wrote Llama-2's ``</s>``.
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
    model = load_base_model(recipe)
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
    for step in range(0, len(batches), accumulation):
        for batch in batches[step : step + accumulation]:
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [0] * (longest - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16) if recipe.bf16 else contextlib.nullcontext():
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss / accumulation
            loss.backward()
            positions += input_ids.numel()
            tokens += int(mask.sum())
            supervised += int((labels[:, 1:] != -100).sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    return {
        "seconds": time.perf_counter() - started,
        "positions": positions,
        "tokens": tokens,
        "supervised": supervised,
        "steps": steps,
        "cpu_seconds": time.process_time() - cpu_started,
    }


# ------------------------------------------------------------------ TRL, plain and ours


def counting(trainer_class):
    class Counting(trainer_class):
        positions = tokens = supervised = 0

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self.positions += inputs["input_ids"].numel()
            self.tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self.supervised += int((inputs["labels"][:, 1:] != -100).sum())
            return super().training_step(model, inputs, *args, **kwargs)

    return Counting


def plain_trl(recipe, rows: list[dict]) -> dict:
    """SFTTrainer with its defaults and the same LoRA settings, on prompt/completion rows in the seed format."""
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
                "completion": f" {r['output']} </s>",
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
        logging_steps=1000,
        disable_tqdm=True,
    )
    trainer = counting(SFTTrainer)(
        model=load_base_model(recipe),
        args=args,
        train_dataset=dataset,
        peft_config=lora_config(recipe),
        processing_class=AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "llama2"),
    )
    started = time.perf_counter()
    trainer.train()
    return {
        "seconds": time.perf_counter() - started,
        "positions": trainer.positions,
        "tokens": trainer.tokens,
        "supervised": trainer.supervised,
        "steps": trainer.state.global_step,
    }


def ours(recipe) -> dict:
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
    trainer = RecipeTrainer(
        model=add_adapter(load_base_model(recipe), recipe),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        fused_loss=uses_fused_loss(recipe.lm_head_loss),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - started + preprocessing
    cpu_seconds = time.process_time() - cpu_started + cpu_preprocessing
    trainer.save_model(recipe.output_dir)
    return {
        "seconds": seconds,
        "positions": trainer.positions,
        "tokens": trainer.tokens,
        "supervised": trainer.supervised,
        "steps": trainer.state.global_step,
        "cpu_seconds": cpu_seconds,
    }


# ------------------------------------------------------------------ memory, load, merge


def peak_rss_child(argv: list[str]) -> int:
    """Peak resident memory of a fresh process doing one configuration (its own ru_maxrss, in bytes)."""
    done = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def smollm2_section(work: Path) -> None:
    """Seed loop vs ours on the real SmolLM2-135M-Instruct base (module docstring): QLoRA NF4, fp32 compute."""
    import torch
    import transformers

    from hf_lora_recipe.devtools.real_base import materialise_smollm2

    base = materialise_smollm2()  # offline: built from the GGUF in the installed wheel, cached after the first time
    rows, data = alpaca_rows(work, SMOLLM2_ROWS, "smollm2-rows.json")
    settings = dict(
        micro_batch=SMOLLM2_MICRO_BATCH,
        accumulation=SMOLLM2_ACCUMULATION,
        max_length=SMOLLM2_MAX_LENGTH,
        bnb_4bit_compute_dtype="float32",
        bf16=False,
        chat_template="llama2",
        gradient_checkpointing=True,
    )
    configurations = (
        (
            "seed loop (hand-written LoRALinear, padded)",
            lambda: seed_loop(recipe_for(base, data, work, run="smollm2-seed", **settings), rows, tokenizer_path=base),
        ),
        (
            "ours, default (CPU: padding-free, plain loss)",
            lambda: ours(recipe_for(base, data, work, run="smollm2-ours", **settings)),
        ),
    )
    results: dict[str, dict] = {}
    for name, function in configurations:
        before = os.getloadavg()[0]
        results[name] = function()
        r = results[name]
        r["load"] = (before, os.getloadavg()[0])
        print(
            f"SmolLM2 {name}: {r['steps']} steps, {r['supervised'] / r['seconds']:,.1f} supervised tokens/s, "
            f"{r['supervised'] / r['cpu_seconds']:,.1f} per CPU-second (load average {before:.2f} -> "
            f"{r['load'][1]:.2f})",
            flush=True,
        )

    baseline = results[configurations[0][0]]
    config = json.loads((base / "config.json").read_text())
    steps = SMOLLM2_ROWS // (SMOLLM2_MICRO_BATCH * SMOLLM2_ACCUMULATION)
    lines = [
        f"### CPU training throughput, real base, {datetime.date.today()} - SmolLM2-135M-Instruct, first "
        f"{SMOLLM2_ROWS} Alpaca rows, micro-batch {SMOLLM2_MICRO_BATCH} x accumulation {SMOLLM2_ACCUMULATION}, "
        f"max_length {SMOLLM2_MAX_LENGTH}, {steps} optimizer steps each, QLoRA NF4 + double quant with "
        "bnb_4bit_compute_dtype float32 and bf16 false (no autocast), LoRA r=16 x 7, checkpointing, llama2 template",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}; base {base.name} (dequantized Q4_1 copy, "
        f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, vocab {config['vocab_size']:,})",
        "fp32 compute because this CPU has no fast bf16 matmul (NF4 with bf16 compute and autocast: ~130 s per 256 "
        "tokens forward+backward, fp32: ~4 s); both loops use the same recipe fields. The machine is shared: "
        "compare the two rows of one run, not runs with each other.",
        "",
        "| configuration | optimizer steps | supervised tokens | seconds | supervised tok/s | total tok/s "
        "| padding waste | vs seed loop (supervised tok/s) | CPU-seconds | supervised tok per CPU-s "
        "| vs seed loop (per CPU-s) | load average (1 min, before -> after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        waste = 1 - r["tokens"] / r["positions"]
        ratio = (r["supervised"] / r["seconds"]) / (baseline["supervised"] / baseline["seconds"])
        cpu_ratio = (r["supervised"] / r["cpu_seconds"]) / (baseline["supervised"] / baseline["cpu_seconds"])
        lines.append(
            f"| {name} | {r['steps']} | {r['supervised']:,} | {r['seconds']:.1f} | "
            f"{r['supervised'] / r['seconds']:,.1f} | {r['tokens'] / r['seconds']:,.1f} | {waste:.1%} | "
            f"{ratio:.2f}x | {r['cpu_seconds']:.1f} | {r['supervised'] / r['cpu_seconds']:,.1f} | "
            f"{cpu_ratio:.2f}x | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |"
        )
    same = len({r["supervised"] for r in results.values()}) == 1
    lines += [
        "",
        "Timed from the first tokenizer call (seed) or the data step (ours) to the last optimizer step; "
        "model loading excluded; CPU-seconds are this process's (all threads) over the same span. The seed "
        "loop runs first. "
        + (
            "Both train on the same supervised tokens."
            if same
            else "Supervised counts differ: the seed tokenizes `[INST] prompt [/INST] response "
            "EOS` as one text, ours tokenizes the template's chunks."
        ),
        "",
    ]
    append_results(lines)


SECTIONS = {"tiny": tiny_section, "smollm2": smollm2_section}


def main() -> int:
    if sys.argv[1:2] == ["--memory-child"]:
        memory_child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), help="run one section (default: all of them, in order)")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = time.perf_counter()
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            section(work)
    print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
