"""``hf-lora-recipe merge``: fold an adapter into its base and write a standalone model.

    hf-lora-recipe merge --adapter DIR_OR_REPO --output DIR [--base PATH_OR_REPO] [--dtype bfloat16]
                         [--merge_into dequantized|original] [--overwrite]

The base is loaded unquantized - LoRA is never merged into 4-bit weights. A QLoRA adapter was trained
against the NF4-rounded base, so by default it is merged into the *dequantized NF4* weights: the merged
model then computes what was trained. ``--merge_into original`` merges into the original weights instead
(closer to the unquantized base, further from what the adapter learned against; see docs/shipping.md for figures).
Only the main process writes, into a temporary directory renamed into place when complete.

--output never destroys what merge did not write. Checked before anything is loaded (``~`` is expanded):

* a new path, or an existing empty folder: written;
* an existing file, a symbolic link, the adapter's (or a local base's) folder, a folder inside it or one that
  contains it: refused;
* a non-empty folder that is not a merged model of ours: refused, whatever its contents;
* a merged model of ours: refused unless ``--overwrite``, which replaces it atomically (renames only) - and
  even then refused if it also holds files merge did not write.

"Ours" is recognised by the marker file ``.hf-lora-recipe-merge`` written, last, into every merged output: JSON
naming the adapter, the base and the files merge wrote (a dot-file, so ``push`` never publishes it). A folder
written before the marker existed counts as ours when it has ``config.json``, a README.md whose metadata tags
include ``hf-lora-recipe`` and ``merged``, and only files merge writes.
"""

from __future__ import annotations

from hf_lora_recipe import log
from hf_lora_recipe.recipe.cli_args import CommandParser, command
from hf_lora_recipe.shipping.merging import DTYPES, MERGE_INTO, merge


PARSER = CommandParser("merge", __doc__)
PARSER.add_argument("--adapter", required=True, help="adapter directory or Hub repo id")
PARSER.add_argument("--output", required=True, help="directory for the merged model")
PARSER.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
PARSER.add_argument(
    "--dtype", default="bfloat16", choices=DTYPES, help="dtype of the merged weights (default: bfloat16)"
)
PARSER.add_argument("--merge_into", choices=MERGE_INTO, help="default: dequantized for QLoRA adapters, else original")
PARSER.add_flag("--overwrite", help="replace a merged model this command wrote earlier at --output (atomically)")


@command
def main(argv: list[str]) -> int:
    args = PARSER.parse(argv)
    path = merge(args.adapter, args.output, args.base, args.dtype, args.merge_into, args.overwrite)
    log.info(f"merged model written to {path}")
    return 0
