"""The seed recipe on a Llama-3-8B-shaped model with random weights: tokens/s, MFU and peak memory vs `plan`.

    python benchmarks/gpu_throughput.py --model_config PATH/llama-3-8b [--out results.md]   # on a GPU
    python benchmarks/gpu_throughput.py --tiny                                             # CPU smoke run

No download: the model is built from config.json straight on the device with random weights, its decoder
projections quantized to NF4 (double quantization, bf16 compute and storage) exactly as loading with the
recipe's BitsAndBytesConfig would, then trained through the package's own path (PEFT k-bit preparation,
LoRA r=16 on all seven projections, TRL SFTTrainer with the recipe's settings) on random token sequences
of max_length tokens whose first quarter is masked. Measured per micro-batch: peak
``torch.cuda.max_memory_allocated`` against the planner's estimate; at micro-batch 4: tokens/s over timed
steps after warm-up and MFU against the FLOPs per token the planner counts.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def quantized_random_model(config, device: str, recipe):
    """Random init on ``device``, then every decoder nn.Linear replaced by a 4-bit ``Linear4bit`` quantized as the
    recipe's ``BitsAndBytesConfig`` (``modeling.quantization_config``) would."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.modeling import quantization_config

    bnb_config = quantization_config(recipe)
    compute, storage = bnb_config.bnb_4bit_compute_dtype, bnb_config.bnb_4bit_quant_storage
    quant = dict(compress_statistics=bnb_config.bnb_4bit_use_double_quant, quant_type=bnb_config.bnb_4bit_quant_type,
                 quant_storage=storage)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=compute)
    for layer in model.model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                              compute_dtype=compute, device="meta", **quant)
                quantized.weight = bnb.nn.Params4bit(module.weight.data.to(compute), requires_grad=False,
                                                     module=quantized, **quant)
                quantized.weight._quantize(device) if device != "cpu" else quantized.weight._quantize("cpu")
                setattr(parent, name.rsplit(".", 1)[-1], quantized)
                del module
    # What from_pretrained(quantization_config=...) records, so PEFT's k-bit preparation treats it the same.
    model.is_loaded_in_4bit = True
    model.config.quantization_config = bnb_config
    model.config.use_cache = False
    gc.collect()
    return model


def random_dataset(vocab: int, rows: int, length: int):
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 10, (rows, length), generator=generator).tolist()
    labels = [[-100] * (length // 4) + row[length // 4:] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def padding_tokenizer():
    """The collator only needs a pad id: a two-token tokenizer, built here, stands in for Llama 3's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


class StepTimer:
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.sync()
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.start)

        return Callback()

    @staticmethod
    def sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(self) -> list[float]:
        return self.times[self.warmup:]


def run(model, recipe, micro_batch: int, steps: int, warmup: int, output_dir: str):
    import torch

    from hf_lora_recipe.trainer import trainer_config
    from hf_lora_recipe.trainer import RecipeTrainer, uses_fused_loss

    recipe = recipe.__class__(**{**recipe.__dict__, "per_device_train_batch_size": micro_batch,
                                 "global_batch_size": micro_batch, "max_steps": steps, "output_dir": output_dir,
                                 "logging_steps": 10_000, "save_steps": 10_000})
    args = trainer_config(recipe, accumulation=1)
    args.save_strategy = "no"
    args.disable_tqdm = True
    dataset = random_dataset(model.config.vocab_size, micro_batch * steps, recipe.max_length)
    timer = StepTimer(warmup)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = RecipeTrainer(model=model, args=args, train_dataset=dataset, processing_class=padding_tokenizer(),
                            callbacks=[timer.callback()], fused_loss=uses_fused_loss(recipe.lm_head_loss))
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    timed = timer.timed()
    del trainer
    gc.collect()
    return peak, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default=str(REPO_ROOT.parent / "shared" / "model_configs" / "llama-3-8b"))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model of the same family, on the CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--variants", action="store_true",
                        help="also micro-batch 4 with the plain loss, without gradient checkpointing, and bf16 LoRA")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig

    from hf_lora_recipe.config import load_recipe
    from hf_lora_recipe.modeling import add_adapter
    from hf_lora_recipe.plan import GIB, flops_per_token, measure_shape, memory

    recipe = load_recipe(REPO_ROOT / "recipes" / "llama3-8b-alpaca-qlora.yaml")
    config = AutoConfig.from_pretrained(args.model_config)
    if args.tiny:
        config = config.__class__(**{**config.to_dict(), "hidden_size": 64, "intermediate_size": 224,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "vocab_size": 4096, "head_dim": 16})
        recipe = recipe.__class__(**{**recipe.__dict__, "max_length": 64})
        args.steps, args.warmup = min(args.steps, 4), 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = measure_shape(config, recipe)
    per_token = flops_per_token(shape, recipe)["total"]

    started = time.perf_counter()
    model = add_adapter(quantized_random_model(config, device, recipe), recipe)
    build_s = time.perf_counter() - started
    rows = []
    for micro_batch in (1, 2, 4):
        steps = args.steps + args.warmup if micro_batch == 4 else 3
        peak, timed = run(model, recipe, micro_batch, steps, args.warmup if micro_batch == 4 else 1, "/tmp/gpu-bench")
        estimate = memory(shape, recipe, micro_batch).total - memory(shape, recipe, micro_batch).cuda_context
        tokens_s = micro_batch * recipe.max_length / (sum(timed) / len(timed)) if timed else 0.0
        rows.append((micro_batch, peak, estimate, tokens_s))
        print(f"micro-batch {micro_batch}: peak {peak / GIB:.2f} GiB, plan {estimate / GIB:.2f} GiB, {tokens_s:,.0f} tokens/s",
              flush=True)

    variant_rows = []
    if args.variants:
        import dataclasses

        del model
        gc.collect()
        for label, changes in (("QLoRA, embeddings/norms/LM head kept bf16 (kbit_upcast_fp32: false)",
                                {"kbit_upcast_fp32": False}),
                               ("QLoRA, model cross-entropy instead of TRL's fused LM head", {"lm_head_loss": "plain"}),
                               ("QLoRA, no checkpointing", {"gradient_checkpointing": False}),
                               ("bf16 LoRA, checkpointing", {"load_in_4bit": False})):
            variant = dataclasses.replace(recipe, **changes)
            if variant.load_in_4bit:
                base = quantized_random_model(config, device, variant)
            else:
                from transformers import AutoModelForCausalLM

                torch.manual_seed(0)
                with torch.device(device):
                    base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
                base.config.use_cache = False
            variant_model = add_adapter(base, variant)
            peak, timed = run(variant_model, variant, 4, args.steps + args.warmup, args.warmup, "/tmp/gpu-bench")
            variant_shape = measure_shape(config, variant)
            estimate = memory(variant_shape, variant, 4).total - memory(variant_shape, variant, 4).cuda_context
            tokens_s = 4 * variant.max_length / (sum(timed) / len(timed)) if timed else 0.0
            variant_rows.append((label, peak, estimate, tokens_s, flops_per_token(variant_shape, variant)["total"]))
            print(f"{label}: peak {peak / GIB:.2f} GiB, plan {estimate / GIB:.2f} GiB, {tokens_s:,.0f} tokens/s", flush=True)
            del variant_model, base
            gc.collect()

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        f"### GPU throughput and memory, {datetime.date.today()} - {name}{' (--tiny)' if args.tiny else ''}",
        f"seed recipe (NF4 + double quant, bf16 compute, LoRA r=16 x 7 projections, max_length {recipe.max_length}, "
        f"gradient checkpointing, TRL SFTTrainer); model built in {build_s:.0f} s; torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"FLOPs per token (plan): {per_token / 1e9:.1f} GFLOP; MFU against 989.4 (datasheet) and 790 (measured matmul) TFLOP/s",
        "",
        "| micro-batch | peak allocated | plan (excl. CUDA context) | plan / measured | tokens/s | MFU (989) | MFU (790) |",
        "|---|---|---|---|---|---|---|",
    ]
    for micro_batch, peak, estimate, tokens_s in rows:
        ratio = f"{estimate / peak:.2f}" if peak else "n/a"
        mfu = lambda peak_tflops: f"{tokens_s * per_token / (peak_tflops * 1e12):.1%}" if tokens_s and device == "cuda" else "n/a"  # noqa: E731
        lines.append(f"| {micro_batch} x {recipe.max_length} | {peak / GIB:.2f} GiB | {estimate / GIB:.2f} GiB | {ratio} | "
                     f"{tokens_s:,.0f} | {mfu(989.4)} | {mfu(790)} |")
    if variant_rows:
        lines += ["", "| variant at micro-batch 4 | peak allocated | plan (excl. CUDA context) | plan / measured | tokens/s | MFU (989) |",
                  "|---|---|---|---|---|---|"]
        for label, peak, estimate, tokens_s, flops in variant_rows:
            mfu = f"{tokens_s * flops / 989.4e12:.1%}" if device == "cuda" else "n/a"
            lines.append(f"| {label} | {peak / GIB:.2f} GiB | {estimate / GIB:.2f} GiB | {estimate / peak:.2f} | "
                         f"{tokens_s:,.0f} | {mfu} |" if peak else f"| {label} | n/a | {estimate / GIB:.2f} GiB | n/a | {tokens_s:,.0f} | n/a |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
