"""Merge figures on a real pretrained base: a QLoRA adapter on SmolLM2-135M-Instruct, merged by ``merge``.

    make bench-merge      # or: .venv/bin/python benchmarks/merge_real.py [--rows 4] [--lora_b_std 0.01]

The merge table in docs/shipping.md comes from a tiny random Llama; this repeats it on real weights: the SmolLM2 base that
``hf-lora-recipe base`` materialises (a dequantized Q4_1 copy, bf16 - realbase.py). The adapter is the seed's
LoRA (r=16, alpha 32, all seven projections) built on the NF4 base as training loads it; A is PEFT's
initialisation and B is drawn from N(0, lora_b_std) instead of zeros, so the adapter changes the model as a
trained one would. It is saved as a run's output_dir (adapter, tokenizer, recipe.yaml with load_in_4bit), so
``merge`` treats it as QLoRA. The reference is the adapter on its NF4 base (bf16 compute): what training
computes; a second one runs the same NF4 weights with fp32 compute, which takes the reference's own bf16
rounding out of the comparison. Each merged model - into the dequantized NF4 weights (merge's default for
QLoRA) or into the original bf16 weights, written in bf16 or fp32 and loaded in that dtype - is compared with
them on the logits of the first --rows Alpaca examples (prompt and response through the model's ChatML
template, every position). Two rows for scale: the NF4 base without the adapter (the adapter's own effect)
and the adapter on the unquantized base (what NF4 rounding moves). A last line checks ``merge_and_unload``
alone: the fp32 merge against the same adapter, unmerged, on the very base merge loads.
Printed only (copy the table into benchmarks/RESULTS.md by hand).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_LORA_RECIPE_SHARED", REPO_ROOT.parent / "shared"))
sys.path.insert(0, str(REPO_ROOT))


def build_adapter(base: Path, out_dir: Path, lora_b_std: float, seed: int = 0) -> Path:
    """A QLoRA run's output_dir with random (non-zero) B: adapter, the base's tokenizer, recipe.yaml."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from hf_lora_recipe.inits.adapter import lora_config
    from hf_lora_recipe.model.loading import load_base_model
    from hf_lora_recipe.recipe.schema import Recipe, dump_recipe
    from hf_lora_recipe.templates.tokenizer import save_tokenizer

    recipe = Recipe(model_name_or_path=str(base), load_in_4bit=True, chat_template="native", output_dir=str(out_dir))
    torch.manual_seed(seed)
    model = get_peft_model(load_base_model(recipe), lora_config(recipe))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=lora_b_std)
    model.save_pretrained(out_dir)
    save_tokenizer(AutoTokenizer.from_pretrained(base), out_dir)
    dump_recipe(recipe, out_dir / "recipe.yaml")
    return out_dir


def alpaca_sequences(tokenizer, rows: int) -> list[list[int]]:
    examples = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())[:rows]
    sequences = []
    for example in examples:
        prompt = example["instruction"] + (f"\n\n{example['input']}" if example["input"] else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["output"]}]
        sequences.append(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"])
    return sequences


def logits(model, sequences):
    import torch

    with torch.no_grad():
        return torch.cat([model.eval()(input_ids=torch.tensor([ids])).logits[0].float() for ids in sequences])


def compare(candidate, references) -> list[str]:
    """Table cells: max / mean |logit diff| and top-1 agreement against each reference."""
    cells = []
    for reference in references:
        diff = (candidate - reference).abs()
        top1 = (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item()
        cells += [f"{diff.max().item():.4f} / {diff.mean().item():.5f}", f"{top1:.2%}"]
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="Alpaca examples compared (default: 4)")
    parser.add_argument("--lora_b_std", type=float, default=0.02, help="std of the random LoRA B (default: 0.02)")
    parser.add_argument("--work_dir", help="keep the adapter and merged models here (default: a temporary folder)")
    args = parser.parse_args()

    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_lora_recipe.devtools.real_base import MARKER, materialise_smollm2
    from hf_lora_recipe.model.loading import quantization_config
    from hf_lora_recipe.recipe.schema import Recipe, saved_recipe
    from hf_lora_recipe.shipping.merging import load_merge_base, merge
    from hf_lora_recipe.upstream.notices import quiet_libraries

    quiet_libraries()
    base = materialise_smollm2()
    note = json.loads((base / MARKER).read_text())["note"]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="merge-real-"))
    work.mkdir(parents=True, exist_ok=True)
    adapter = build_adapter(base, work / "adapter", args.lora_b_std)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    sequences = alpaca_sequences(tokenizer, args.rows)
    nf4 = quantization_config(Recipe())

    def nf4_base(compute=torch.bfloat16):
        config = nf4 if compute == torch.bfloat16 else quantization_config(Recipe(bnb_4bit_compute_dtype="float32"))
        return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=compute)

    references = [
        logits(PeftModel.from_pretrained(nf4_base(compute), adapter), sequences)
        for compute in (torch.bfloat16, torch.float32)
    ]
    rows, notes = [], []
    for merge_into, dtype, label in (
        ("dequantized", "bfloat16", "merged into dequantized NF4, bf16 (the default)"),
        ("dequantized", "float32", "merged into dequantized NF4, fp32"),
        ("original", "bfloat16", "merged into the original bf16 weights, bf16"),
        ("original", "float32", "merged into the original bf16 weights, fp32"),
    ):
        started = time.perf_counter()
        merged_dir = merge(str(adapter), work / f"merged-{merge_into}-{dtype}", dtype=dtype, merge_into=merge_into)
        seconds = time.perf_counter() - started
        saved_dtype = json.loads((merged_dir / "config.json").read_text()).get("dtype")
        if saved_dtype != dtype:
            notes.append(
                f"merge --merge_into {merge_into} --dtype {dtype} wrote config.json dtype {saved_dtype!r}: "
                f"loaded here with dtype={dtype} explicitly (a plain from_pretrained gives {saved_dtype})"
            )
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype))
        merged_logits = logits(merged, sequences)
        rows.append((label, compare(merged_logits, references), f"{seconds:.1f} s"))
        if (merge_into, dtype) == ("dequantized", "float32"):
            # .float(): the dequantized base keeps embeddings and norms in the compute dtype (bf16, exact in fp32)
            dense = load_merge_base(str(base), saved_recipe(adapter), merge_into, torch.float32).float()
            unmerged = PeftModel.from_pretrained(dense, adapter)
            merge_alone = (merged_logits - logits(unmerged, sequences)).abs()
            del unmerged
        del merged, merged_logits
    without = compare(logits(nf4_base(), sequences), references)
    rows.append(("for scale: the NF4 base without the adapter", without, ""))
    unquantized = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter)
    on_bf16 = compare(logits(unquantized, sequences), references)
    rows.append(("for scale: the adapter on the unquantized bf16 base", on_bf16, ""))

    tokens = sum(len(ids) for ids in sequences)
    print(f"\n### Merge on a real base, {datetime.date.today()} - SmolLM2-135M-Instruct, QLoRA r=16 x 7 projections")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; base: {note}"
    )
    print(
        f"adapter: LoRA B ~ N(0, {args.lora_b_std}), A as PEFT initialises it; references: the adapter on its NF4 "
        "base (double quant), bf16 compute (as trained) and fp32 compute; logits at all "
        f"{tokens} positions of {len(sequences)} Alpaca examples (prompt + response, ChatML)\n"
    )
    print(
        "| model | vs adapter on NF4, bf16 compute: max / mean abs logit diff | same top-1 | "
        "vs adapter on NF4, fp32 compute: max / mean | same top-1 | merge + write |"
    )
    print("|---|---|---|---|---|---|")
    for label, cells, seconds in rows:
        print(f"| {label} | {' | '.join(cells)} | {seconds} |")
    print(
        f"\nmerge_and_unload alone: the fp32 merge into dequantized NF4 vs the adapter unmerged on that same "
        f"dequantized base (fp32): max {merge_alone.max().item():.2e} / mean {merge_alone.mean().item():.2e} "
        "abs logit diff"
    )
    for note in notes:
        print(f"\nnote: {note}")
    print(f"\nwork folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
