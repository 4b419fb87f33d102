"""``hf-lora-recipe export``: the adapter as GGUF for llama.cpp, Ollama and LM Studio, checked by llama.cpp itself.

    hf-lora-recipe export --adapter DIR --output DIR [--format gguf] [--quant f16|bf16|f32|q8_0]
                          [--base_gguf FILE] [--merged] [--verify BOOL] [--overwrite]

Writes, with llama.cpp's own converters (docs/shipping.md, "Export for llama.cpp / Ollama"):

* ``adapter-QUANT.gguf``: the adapter as a GGUF LoRA, for any GGUF of its base (``llama-cli -m BASE.gguf
  --lora adapter-QUANT.gguf``); without ``--base_gguf``, ``base-QUANT.gguf`` beside it, converted from the base;
* with ``--merged``: ``model-QUANT.gguf``, the adapter merged into its base (as ``merge`` does);
* ``Modelfile``: ``ollama create NAME -f DIR/Modelfile``, with the adapter's chat template as Ollama's TEMPLATE.

Each GGUF carries the adapter's chat template and end-of-turn token. ``--verify`` (on when llama-cpp-python is
installed) runs the export in llama.cpp on held-out prompts and compares it with transformers + PEFT: first-token
logits and greedy replies, judged against the same comparison of the base GGUF with the base; the table is printed
and saved as gguf_agreement.json, and an export that falls short fails in one line.

llama.cpp's converters come from ``--llama_cpp DIR`` (a llama.cpp checkout), ``$LLAMA_CPP_DIR``, or the cache that
``--fetch_converters`` fills from llama-cpp-python's source package (``make gguf`` does this).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

from hf_lora_recipe import log
from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.recipe.schema import COUNT, RecipeError
from hf_lora_recipe.upstream.llama_cpp import QUANTS


PARSER = CommandParser("export", __doc__)
PARSER.add_argument("--adapter", metavar="DIR", help="the adapter's folder (a training output_dir)")
PARSER.add_argument("--output", metavar="DIR", help="a new or empty folder for the export")
PARSER.add_argument("--format", default="gguf", choices=("gguf",), help="what to export to (default: gguf)")
PARSER.add_argument("--quant", default="f16", choices=QUANTS, help="precision of the written weights (default: f16)")
PARSER.add_flag("--merged", help="write the adapter merged into its base as one GGUF instead of a GGUF LoRA")
PARSER.add_argument("--base", metavar="DIR", help="the base model's folder (default: the one in adapter_config.json)")
PARSER.add_argument(
    "--base_gguf", metavar="FILE", help="a GGUF of the base to run the LoRA on (default: convert the base)"
)
PARSER.add_argument(
    "--verify",
    nargs="?",
    const="true",
    default=None,
    choices=("true", "false"),
    metavar="BOOL",
    help="check the export in llama.cpp against transformers (default: true when llama-cpp-python is installed)",
)
PARSER.add_argument("--dataset", metavar="PATH_OR_ID", help="prompts to verify on (default: the run's held-out set)")
PARSER.add_argument(
    "--split", metavar="NAME", help="the split of --dataset (default: test, else validation, else train)"
)
PARSER.add_number("--num_prompts", int, COUNT, 8, "held-out prompts to verify on", metavar="N")
PARSER.add_number(
    "--max_new_tokens", int, COUNT, None, "greedy reply length when verifying (default: sized from the references)"
)
PARSER.add_flag("--no_modelfile", help="write no Ollama Modelfile")
PARSER.add_flag("--overwrite", help="replace an export this command wrote earlier at --output (atomically)")
PARSER.add_argument("--llama_cpp", metavar="DIR", help="a llama.cpp checkout holding its converters")
PARSER.add_argument(
    "--fetch_converters",
    nargs="?",
    const="",
    metavar="SDIST",
    help="put llama.cpp's converters in the cache first: from llama-cpp-python's source package SDIST, or "
    "downloaded by pip when no file is given",
)


def verification_data(adapter_dir: Path, dataset: str | None, split: str | None) -> object:
    """The prompts to verify on: the run's held-out set, or ``--dataset``/``--split`` (as ``eval`` chooses)."""
    from hf_lora_recipe.evaluation.scoring import choose_data
    from hf_lora_recipe.recipe.schema import Recipe, saved_recipe

    try:
        return choose_data(saved_recipe(str(adapter_dir)) or Recipe(), str(adapter_dir), dataset, split)
    except RecipeError as error:
        raise RecipeError(f"{error}; or pass --verify false") from None


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    from hf_lora_recipe.shipping.gguf_export import add_to_export, fetch_converters, plan_export, write_export

    if args.fetch_converters is not None:
        fetch_converters(args.fetch_converters or None)
        if args.adapter is None and args.output is None:
            return 0
    if args.adapter is None or args.output is None:
        raise RecipeError("give --adapter DIR and --output DIR (or only --fetch_converters)")
    installed = importlib.util.find_spec("llama_cpp") is not None
    if args.verify == "true" and not installed:
        raise RecipeError(
            "--verify needs llama-cpp-python, which is not installed: pip install 'hf-lora-recipe[gguf]' "
            "(or pass --verify false)"
        )
    verify = installed if args.verify is None else args.verify == "true"
    plan = plan_export(
        args.adapter,
        args.output,
        base=args.base,
        base_gguf=args.base_gguf,
        merged=args.merged,
        quant=args.quant,
        llama_cpp_dir=args.llama_cpp,
        overwrite=args.overwrite,
        modelfile=not args.no_modelfile,
    )
    data = verification_data(plan.adapter_dir, args.dataset, args.split) if verify else None
    exported = write_export(plan)
    log.info(f"GGUF export written to {exported.folder}")
    if not verify:
        if not installed:
            log.info("not verified: llama-cpp-python is not installed (pip install 'hf-lora-recipe[gguf]')")
        return 0
    from hf_lora_recipe.evaluation.gguf_agreement import check, verify_export
    from hf_lora_recipe.shipping.gguf_export import convert_base, converters_dir

    with tempfile.TemporaryDirectory(prefix=".floor-", dir=exported.folder.parent) as scratch:
        floor = exported.model if not args.merged else None
        if floor is None:
            floor = Path(args.base_gguf).expanduser() if args.base_gguf else None
        if floor is None:
            floor = convert_base(
                converters_dir(args.llama_cpp), exported.base, args.quant, Path(scratch) / "base.gguf"
            )
        agreement = verify_export(exported, data, args.num_prompts, args.max_new_tokens, floor)
    print(agreement.table())
    add_to_export(exported.folder, "gguf_agreement.json", json.dumps(agreement.as_dict(), indent=2) + "\n")
    check(agreement, f"--verify on {exported.folder}")
    return 0
