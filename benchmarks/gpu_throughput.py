"""The seed recipe's speed options side by side on a Llama-3-8B-shaped model: tokens/s, MFU, peak vs planned memory.

    python benchmarks/gpu_throughput.py [--out_dir DIR] [--only 'NAME;NAME']    # on a GPU, ~6-8 minutes on an H200
    python benchmarks/gpu_throughput.py --tiny                                # the same variants, tiny, on the CPU

No download: each variant builds the model from config.json straight on the device with random weights, its
decoder projections quantized to NF4 exactly as the recipe's BitsAndBytesConfig would (double quantization, bf16
compute and storage), then trains through the package's own path (``inits.adapter.add_adapter``: LoRA r=16 on all
seven projections, compile when asked; ``trainer.build_trainer``: TRL SFTTrainer with the recipe's settings).

Variants run one after another in this one process; the first is run again at the end, so the table shows how
much the machine drifted. Two data sets: full 512-token rows (the seed's micro-batch 4 x 512 as measured before)
and rows with Alpaca's length distribution (lognormal around its mean of ~197 tokens, at most 512), where
padding-free attention has padding to remove. tokens/s counts real tokens of the timed steps (after warm-up);
MFU is tokens/s x plan's FLOPs per token over the peak: the datasheet's and this GPU's measured bf16 matmul
peak. Peak memory is ``torch.cuda.max_memory_allocated``; the plan's estimate excludes its 1 GiB CUDA-context
allowance, which that counter does not see. Each row carries the prediction written before the run.

Writes ``gpu_throughput.jsonl`` (one object per variant) and ``gpu_throughput.md`` (the table) into --out_dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
ALPACA_MEAN, ALPACA_SIGMA = 197, 0.75  # tokens per example (Llama-2 tokenizer), lognormal spread


@dataclass
class Variant:
    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    data: str = "full"  # "full": every row max_length tokens; "alpaca": Alpaca-like lengths
    trainer: str = "recipe"  # "trl": TRL's own SFTTrainer.compute_loss (reads metrics every micro-batch)
    needs_cuda: bool = False
    # written before the first GPU run: tokens/s relative to the seed row, and peak GiB
    predicted_speed: float | None = None
    predicted_peak_gib: float | None = None


VARIANTS = [
    Variant("seed (micro-batch 4, fused LM head)", predicted_speed=1.0, predicted_peak_gib=6.8),
    Variant(
        "seed, TRL's compute_loss (host reads per micro-batch)",
        trainer="trl",
        predicted_speed=0.95,
        predicted_peak_gib=6.8,
    ),
    Variant(
        "per_device_train_batch_size auto",
        {"per_device_train_batch_size": "auto"},
        predicted_speed=2.5,
        predicted_peak_gib=55,
    ),
    Variant(
        "activation_offloading",
        {"activation_offloading": True},
        needs_cuda=True,
        predicted_speed=0.9,
        predicted_peak_gib=6.3,
    ),
    Variant(
        "use_liger_kernel", {"use_liger_kernel": True}, needs_cuda=True, predicted_speed=1.1, predicted_peak_gib=6.5
    ),
    Variant("compile (per decoder layer)", {"compile": True}, predicted_speed=1.4, predicted_peak_gib=6.5),
    Variant(
        "memory-lean: auto within 8 GB + compile",
        {"per_device_train_batch_size": "auto", "memory_budget_gb": 8, "compile": True},
        predicted_speed=1.4,
        predicted_peak_gib=6.8,
    ),
    Variant(
        "Alpaca lengths, padded (sdpa)",
        {"padding_free": "false"},
        data="alpaca",
        predicted_speed=0.45,
        predicted_peak_gib=6.5,
    ),
    Variant(
        "Alpaca lengths, padding-free, flex attention",
        {"padding_free": "true", "attn_implementation": "flex_attention"},
        data="alpaca",
        needs_cuda=True,
        predicted_speed=0.45,
        predicted_peak_gib=6.0,
    ),
    Variant(
        "Alpaca lengths, padding-free, varlen attention",
        {"padding_free": "true", "attn_implementation": "varlen"},
        data="alpaca",
        needs_cuda=True,
        predicted_speed=0.45,
        predicted_peak_gib=6.0,
    ),
    Variant(
        "all: auto + compile + liger + varlen, Alpaca lengths",
        {
            "per_device_train_batch_size": "auto",
            "compile": True,
            "use_liger_kernel": True,
            "padding_free": "true",
            "attn_implementation": "varlen",
        },
        data="alpaca",
        needs_cuda=True,
        predicted_speed=2.8,
        predicted_peak_gib=30,
    ),
    Variant("seed again (drift)", predicted_speed=1.0, predicted_peak_gib=6.8),
]


def quantized_random_model(config, device: str, recipe):
    """Random init on ``device``, then every decoder nn.Linear replaced by a 4-bit ``Linear4bit`` quantized as the
    recipe's ``BitsAndBytesConfig`` (``modeling.quantization_config``) would."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.model.loading import attention_for, quantization_config

    bnb_config = quantization_config(recipe)
    compute, storage = bnb_config.bnb_4bit_compute_dtype, bnb_config.bnb_4bit_quant_storage
    quant = dict(
        compress_statistics=bnb_config.bnb_4bit_use_double_quant,
        quant_type=bnb_config.bnb_4bit_quant_type,
        quant_storage=storage,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute, attn_implementation=attention_for(recipe))
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                quantized = bnb.nn.Linear4bit(
                    module.in_features, module.out_features, bias=False, compute_dtype=compute, device="meta", **quant
                )
                quantized.weight = bnb.nn.Params4bit(
                    module.weight.data.to(compute), requires_grad=False, module=quantized, **quant
                )
                quantized.weight._quantize(device)
                setattr(parent, name.rsplit(".", 1)[-1], quantized)
                del module
    # What from_pretrained(quantization_config=...) records, so PEFT's k-bit preparation treats it the same.
    model.is_loaded_in_4bit = True
    model.config.quantization_config = bnb_config
    model.config.use_cache = False
    gc.collect()
    return model


def random_dataset(vocab: int, rows: int, length: int, lengths: str):
    """Token rows whose first quarter is masked (the prompt); ``alpaca``: lognormal lengths around Alpaca's mean."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    if lengths == "alpaca":
        sizes = torch.empty(rows).log_normal_(
            math.log(ALPACA_MEAN) - ALPACA_SIGMA**2 / 2, ALPACA_SIGMA, generator=generator
        )
        sizes = sizes.clamp(16, length).long().tolist()
    else:
        sizes = [length] * rows
    ids = [torch.randint(10, vocab - 10, (size,), generator=generator).tolist() for size in sizes]
    labels = [[-100] * (len(row) // 4) + row[len(row) // 4 :] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels}), sizes


def padding_tokenizer():
    """The collator only needs a pad id: a two-token tokenizer, built here, stands in for Llama 3's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer(times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append(time.perf_counter() - self.start)

    return StepTimer()


def measured_matmul_tflops() -> float | None:
    """This GPU's bf16 dense matmul rate at 8192^3, the practical ceiling for MFU."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    sync()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def run_variant(variant: Variant, seed_recipe, config, device: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from hf_lora_recipe.inits.adapter import add_adapter
    from hf_lora_recipe.planning.estimates import flops_per_token, measure_shape, memory
    from hf_lora_recipe.training.auto_micro_batch import resolve
    from hf_lora_recipe.training.trainer import build_trainer

    recipe = dataclasses.replace(seed_recipe, **variant.changes)
    shape = measure_shape(config, recipe)
    recipe, chosen = resolve(recipe, world_size=1, shape=shape)
    micro_batch = recipe.per_device_train_batch_size
    # one optimizer step per micro-batch: the timing is per micro-batch, the math of the global batch is not at stake
    recipe = dataclasses.replace(
        recipe,
        global_batch_size=micro_batch,
        max_steps=warmup + steps,
        train_sampling_strategy="sequential",
        logging_steps=10_000,
        save_steps=10_000,
    )
    dataset, sizes = random_dataset(config.vocab_size, micro_batch * (warmup + steps), recipe.max_length, variant.data)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = add_adapter(quantized_random_model(config, device, recipe), recipe)
    build_s = time.perf_counter() - started
    times: list[float] = []
    trainer = build_trainer(
        recipe,
        model,
        padding_tokenizer(),
        dataset,
        None,
        1,
        [step_timer(times)],
        flops_per_token(shape, recipe)["total"],
    )
    trainer.args.save_strategy, trainer.args.disable_tqdm = "no", True
    if variant.trainer == "trl":  # TRL's compute_loss as it ships: metrics read every micro-batch, compact head
        import trl.trainer.utils as trl_utils
        from trl import SFTTrainer
        from trl.kernels.chunked_logprob import _use_triton

        trl_utils._use_triton = _use_triton
        trainer.compute_loss = types.MethodType(SFTTrainer.compute_loss, trainer)
    trainer.train()
    if variant.trainer == "trl":
        from hf_lora_recipe.training.trainer import _score_every_position

        _score_every_position()
    timed_s = sum(times[warmup:])
    tokens = sum(sizes[warmup * micro_batch :])
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    planned = memory(shape, recipe, micro_batch)
    result = {
        "variant": variant.name,
        "changes": variant.changes,
        "data": variant.data,
        "micro_batch": micro_batch,
        "auto": chosen.line() if chosen else None,
        "timed_steps": len(times) - warmup,
        "tokens": tokens,
        "seconds": round(timed_s, 3),
        "tokens_per_second": tokens / timed_s if timed_s else 0.0,
        "flops_per_token": flops_per_token(shape, recipe)["total"],
        "peak_bytes": peak,
        "planned_bytes": planned.total - planned.cuda_context,
        "build_seconds": round(build_s, 1),
        "first_step_seconds": round(times[0], 2) if times else None,
        "predicted_speed": variant.predicted_speed,
        "predicted_peak_gib": variant.predicted_peak_gib,
    }
    del trainer, model
    gc.collect()
    return result


def table(results: list[dict[str, Any]], datasheet: float | None, matmul: float | None, name: str) -> str:
    gib = 1024**3
    seed = next((r["tokens_per_second"] for r in results if r.get("tokens_per_second")), None)
    header = (
        f"| variant | micro-batch | tokens/s | vs seed (predicted) | MFU ({datasheet or 'n/a'} datasheet) | "
        f"MFU ({f'{matmul:.0f}' if matmul else 'n/a'} measured matmul) | peak allocated (predicted) | "
        "plan (excl. CUDA context) | first step s |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['variant']} | {r.get('skipped') or 'failed: ' + r['error']} |" + " |" * 7)
            continue
        tps, flops = r["tokens_per_second"], r["flops_per_token"]
        mfu = lambda peak: f"{tps * flops / (peak * 1e12):.1%}" if peak else "n/a"  # noqa: E731
        ratio = f"{tps / seed:.2f}x" if seed else "n/a"
        predicted = f" ({r['predicted_speed']:.2f}x)" if r.get("predicted_speed") else ""
        peak = f"{r['peak_bytes'] / gib:.2f} GiB" if r["peak_bytes"] else "n/a"
        peak += f" ({r['predicted_peak_gib']:g})" if r.get("predicted_peak_gib") and r["peak_bytes"] else ""
        lines.append(
            f"| {r['variant']} | {r['micro_batch']} | {tps:,.0f} | {ratio}{predicted} | {mfu(datasheet)} | "
            f"{mfu(matmul)} | {peak} | {r['planned_bytes'] / gib:.2f} GiB | {r['first_step_seconds']} |"
        )
    return f"### GPU throughput, {datetime.date.today()} - {name}\n\n" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=str(REPO_ROOT.parent / "shared" / "model_configs" / "llama-3-8b"))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model of the same family, on the CPU")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", help="variant names (or prefixes) to run, separated by ';', in this order")
    parser.add_argument(
        "--deadline_s", type=float, help="start no variant after this many seconds (the rest are listed as skipped)"
    )
    parser.add_argument("--out_dir", default=".", help="where gpu_throughput.jsonl and gpu_throughput.md go")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig

    from hf_lora_recipe.recipe.schema import load_recipe

    recipe = load_recipe(REPO_ROOT / "recipes" / "llama3-8b-alpaca-qlora.yaml")
    config = AutoConfig.from_pretrained(args.model_config)
    if args.tiny:
        config = config.__class__(
            **{
                **config.to_dict(),
                "hidden_size": 64,
                "intermediate_size": 224,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 4096,
                "head_dim": 16,
            }
        )
        recipe = dataclasses.replace(recipe, max_length=64, global_batch_size=16)
        args.steps, args.warmup = min(args.steps, 3), 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (--tiny)" if args.tiny else "CPU"
    datasheet = next((tflops for key, tflops in DATASHEET_TFLOPS.items() if key in name), None)
    matmul = measured_matmul_tflops()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = (
        [v for prefix in args.only.split(";") for v in VARIANTS if v.name.startswith(prefix.strip())]
        if args.only
        else VARIANTS
    )
    started = time.monotonic()
    print(
        f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"measured bf16 matmul: {f'{matmul:.0f} TFLOP/s' if matmul else 'n/a'}",
        flush=True,
    )

    results = []
    with open(out_dir / "gpu_throughput.jsonl", "w") as jsonl:
        for variant in chosen:
            if variant.needs_cuda and device != "cuda":
                result = {"variant": variant.name, "skipped": "skipped: needs CUDA"}
            elif args.deadline_s is not None and time.monotonic() - started > args.deadline_s:
                result = {"variant": variant.name, "skipped": f"skipped: past the {args.deadline_s:.0f} s deadline"}
            else:
                try:
                    result = run_variant(variant, recipe, config, device, args.steps, args.warmup)
                except Exception as error:  # noqa: BLE001 - one failing variant must not lose the others' figures
                    traceback.print_exc()
                    result = {"variant": variant.name, "error": f"{type(error).__name__}: {str(error)[:200]}"}
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
            results.append(result)
            jsonl.write(json.dumps(result) + "\n")
            jsonl.flush()
            print(json.dumps(result), flush=True)

    text = table(results, datasheet, matmul, name)
    text += (
        f"\nseed recipe: NF4 + double quant, bf16 compute, LoRA r=16 x 7 projections, max_length "
        f"{recipe.max_length}, gradient checkpointing; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {args.steps} timed steps after {args.warmup} warm-up per variant, each "
        "an optimizer step of one micro-batch\n"
    )
    (out_dir / "gpu_throughput.md").write_text(text)
    print(text)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
