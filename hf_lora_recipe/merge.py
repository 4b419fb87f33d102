"""``hf-lora-recipe merge``: fold an adapter into its base and write a standalone model.

    hf-lora-recipe merge --adapter DIR_OR_REPO --output DIR [--base PATH_OR_REPO] [--dtype bfloat16]
                         [--merge_into dequantized|original]

The base is loaded unquantized - LoRA is never merged into 4-bit weights. A QLoRA adapter was trained
against the NF4-rounded base, so by default it is merged into the *dequantized NF4* weights: the merged
model then computes what was trained. ``--merge_into original`` merges into the original weights instead
(closer to the unquantized base, further from what the adapter learned against; see the README for figures).
Only the main process writes, into a temporary directory renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import log
from .arguments import CommandParser, command
from .config import Recipe, RecipeError, saved_recipe

MERGE_INTO = ("dequantized", "original")
DTYPES = ("bfloat16", "float16", "float32")


def load_merge_base(base: str, recipe: Recipe | None, merge_into: str, dtype: Any) -> Any:
    """The base as dense weights: NF4-rounded (dequantized) or the original checkpoint."""
    from transformers import AutoModelForCausalLM

    from .modeling import quantization_config, torch_dtype

    if merge_into == "original":
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    quantized = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch_dtype(recipe.bnb_4bit_compute_dtype), quantization_config=quantization_config(recipe)
    )
    # Quantization is deterministic, so these are exactly the weights the adapter saw during training.
    return quantized.dequantize(dtype=dtype)


def replace_directory(staging: Path, output: Path) -> None:
    """Put ``staging`` at ``output`` by renames only: readers see the old model or the new one, never half."""
    if output.exists():
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, retired)
        os.replace(staging, output)
        shutil.rmtree(retired)
    else:
        os.replace(staging, output)


def merge(
    adapter: str, output: str | Path, base: str | None = None, dtype: str = "bfloat16", merge_into: str | None = None
) -> Path:
    """Merge ``adapter`` into its base and write the model to ``output``; returns ``output``."""
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if Path(adapter).exists() and not (Path(adapter) / "adapter_config.json").is_file():
        raise RecipeError(f"--adapter {adapter}: no adapter_config.json there (is it a training output_dir?)")
    recipe = saved_recipe(adapter)
    quantized = bool(recipe and recipe.load_in_4bit)
    merge_into = merge_into or ("dequantized" if quantized else "original")
    if merge_into not in MERGE_INTO:
        raise RecipeError(f"--merge_into must be one of {', '.join(MERGE_INTO)}; got {merge_into!r}")
    if merge_into == "dequantized" and not quantized:
        raise RecipeError("--merge_into dequantized is for QLoRA adapters; this one was trained on an unquantized base")

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from .card import LOSS_PLOT, RESULTS_FILE, write_card
    from .quiet import quiet_libraries
    from .tokenizer import save_tokenizer

    quiet_libraries()
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    torch_dtype = getattr(torch, dtype)

    model = PeftModel.from_pretrained(load_merge_base(base, recipe, merge_into, torch_dtype), adapter)
    merged = model.merge_and_unload()
    leftover = [name for name in merged.state_dict() if "lora_" in name]
    if leftover:
        raise RuntimeError(f"merge left adapter tensors behind: {leftover[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    merged.config.use_cache = True
    merged.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if not log.is_main_process():
        return Path(output)

    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        merged.save_pretrained(staging, max_shard_size="5GB")
        save_tokenizer(tokenizer, staging)
        for name in ("recipe.yaml", RESULTS_FILE, LOSS_PLOT):
            if (Path(adapter) / name).is_file():
                shutil.copy(Path(adapter) / name, staging / name)
        merge_base = (
            f"dequantized NF4 weights of `{base}` (what the QLoRA adapter was trained against)"
            if merge_into == "dequantized" else f"original `{base}` weights ({dtype})"
        )
        write_card(staging, location=str(output), kind="merged", merge_base=merge_base)
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


PARSER = CommandParser("merge", __doc__)
PARSER.add_argument("--adapter", required=True, help="adapter directory or Hub repo id")
PARSER.add_argument("--output", required=True, help="directory for the merged model")
PARSER.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
PARSER.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the merged weights (default: bfloat16)")
PARSER.add_argument("--merge_into", choices=MERGE_INTO, help="default: dequantized for QLoRA adapters, else original")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    path = merge(args.adapter, args.output, args.base, args.dtype, args.merge_into)
    log.info(f"merged model written to {path}")
    return 0
