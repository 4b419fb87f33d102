"""The model card (``README.md``) written into every adapter and merged-model directory.

Rendered from ``recipe.yaml`` and ``training_results.json`` so that ``push`` can re-render it with the
repo id in the load snippet. Imports nothing heavy: merge, push and generate use it without training code.

``hf-lora-recipe eval`` (and ``train``, at its end) records its report under ``evaluation`` in
``training_results.json`` and as the card's ``## Evaluation`` section and ``model-index`` metadata: a re-render
gives the same card, and a second evaluation replaces the section rather than adding one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from hf_lora_recipe.files import write_text_atomically, write_texts_atomically


RESULTS_FILE = "training_results.json"
LOSS_PLOT = "training_loss.png"
CARD = "README.md"
OUR_TAG = "hf-lora-recipe"  # in the metadata tags of every card we write: how a README.md is known to be ours
EVALUATION = "evaluation"  # training_results.json key holding the last `hf-lora-recipe eval` report
EVALUATION_HEADING = "## Evaluation"
LIBRARIES = ("hf-lora-recipe", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
EXAMPLE_PROMPT = "Give three tips for staying healthy."


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def base_model_license(base: str) -> str | None:
    """The base's licence from its own model card, when it is on disk (a local dir or the HF cache)."""
    card = Path(base) / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
            card = Path(cached) if isinstance(cached, str) else card
        except Exception:  # noqa: BLE001 - an unknown licence is simply not stated
            return None
    return card_metadata(card).get("license")


def card_metadata(path: Path) -> dict[str, Any]:
    """A model card's YAML metadata block; empty when there is none or it cannot be read or parsed."""
    try:
        match = re.match(r"^---\n(.*?)\n---", path.read_text(encoding="utf-8", errors="replace"), re.S)
        metadata = yaml.safe_load(match.group(1)) if match else None
    except (OSError, yaml.YAMLError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def card_tags(path: Path) -> list[str]:
    """The metadata tags of a model card (empty when it has none or cannot be read)."""
    tags = card_metadata(path).get("tags")
    return [str(tag) for tag in tags] if isinstance(tags, list) else []


def read_run(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(resolved recipe, training results) saved by a training run; empty dicts where absent."""
    recipe_path, results_path = directory / "recipe.yaml", directory / RESULTS_FILE
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return recipe or {}, results


def _template_block(chat_template: str) -> str:
    if chat_template == "llama2":
        return (
            "Llama-2 format, saved as the tokenizer's chat template (`apply_chat_template` reproduces the training "
            "prompt\ntoken for token): `<s>[INST] {user} [/INST] {assistant} </s>`, multi-turn as\n"
            "`<s>[INST] u1 [/INST] a1 </s><s>[INST] u2 [/INST] a2 </s>`. The loss covers each assistant response "
            "and its\nclosing EOS only; BOS, `[INST]`/`[/INST]` and user text are masked. Special-token strings "
            "inside the data\nwere tokenized as text."
        )
    source = (
        "the base tokenizer's own chat template (`chat_template: native`)"
        if chat_template == "native"
        else f"the chat template of `{Path(chat_template).name}`"
    )
    return (
        f"Trained through {source}, saved with the tokenizer: `apply_chat_template(messages, "
        "add_generation_prompt=True)`\nreproduces the training prompt token for token. The loss covers each "
        "assistant turn's content and the\nend-of-turn token that closes it only; system and user turns and the "
        "template's own tokens are masked.\nSpecial-token strings inside the data were tokenized as text. "
        "Generate with that end-of-turn token as the stop token."
    )


def lora_variant(recipe: dict[str, Any]) -> str:
    """``plain LoRA`` or what differs from it: rsLoRA scaling, DoRA, the initialisation, LoRA+ (recipes saved
    before these keys existed are plain LoRA); each init words its own (``LoraInit.card_line``)."""
    from hf_lora_recipe.inits import find

    parts = []
    if recipe.get("use_rslora"):
        parts.append("rsLoRA (scaling alpha/sqrt(r))")
    if recipe.get("use_dora"):
        parts.append("DoRA (trained magnitudes)")
    init = str(recipe.get("init_lora_weights", "true"))
    known = find(init)
    line = known.card_line(recipe, str(recipe.get("output_dir", ""))) if known else f"init_lora_weights {init}"
    if line:
        parts.append(line)
    if recipe.get("loraplus_lr_ratio"):
        parts.append(f"LoRA+ (B learning rate x {recipe['loraplus_lr_ratio']:g})")
    return ", ".join(parts) or "plain LoRA (scaling alpha/r, B = 0 at step 0, one learning rate)"


def _hyperparameters(recipe: dict[str, Any]) -> str:
    derived = recipe.get("derived", {})
    rows = [
        ("LoRA r / alpha / dropout", f"{recipe['lora_r']} / {recipe['lora_alpha']} / {recipe['lora_dropout']}"),
        ("LoRA variant", lora_variant(recipe)),
        ("target modules", ", ".join(recipe["lora_target_modules"])),
        *(
            [("target parameters (MoE experts; their adapters take no dropout)", ", ".join(parameters))]
            if (parameters := recipe.get("lora_target_parameters"))
            else []
        ),
        (
            "base quantization",
            f"bitsandbytes {recipe['bnb_4bit_quant_type']}, double quantization "
            f"{recipe['use_bnb_nested_quant']}, compute {recipe['bnb_4bit_compute_dtype']}"
            if recipe["load_in_4bit"]
            else "none (bf16/fp32 base)",
        ),
        (
            "optimizer",
            f"{recipe['optim']}, betas ({recipe['adam_beta1']}, {recipe['adam_beta2']}), "
            f"weight decay {recipe['weight_decay']}, grad-norm clip {recipe['max_grad_norm']}",
        ),
        (
            "learning rate",
            f"{recipe['learning_rate']}, {recipe['lr_scheduler_type']}, warm-up {recipe['warmup_steps']}",
        ),
        (
            "global batch",
            f"{recipe['global_batch_size']} = micro-batch {recipe['per_device_train_batch_size']} x "
            f"accumulation {derived.get('gradient_accumulation_steps', '?')} x {derived.get('world_size', '?')} processes"
            + (f" ({derived['engine']})" if "engine" in derived else ""),
        ),
        ("epochs / max steps", f"{recipe['num_train_epochs']} / {recipe['max_steps']}"),
        ("max length", recipe["max_length"]),
        (
            "precision / checkpointing",
            f"bf16 {recipe['bf16']} / gradient checkpointing {recipe['gradient_checkpointing']}",
        ),
        ("seed", recipe["seed"]),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


RESULT_LABELS = {
    "final_train_loss": "final train loss",
    "final_eval_loss": "final eval loss",
    "optimizer_steps": "optimizer steps",
    "epochs": "epochs",
    "training_examples": "training examples",
    "tokens_per_epoch": "tokens per epoch",
    "supervised_tokens_per_epoch": "supervised tokens per epoch",
    "wall_time_s": "wall time (s)",
}


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "no held-out set" if key == "final_eval_loss" else "not logged"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _results(results: dict[str, Any]) -> str:
    rows = [f"| {label} | {_shown(key, results[key])} |" for key, label in RESULT_LABELS.items() if key in results]
    return "\n".join(rows) or "| (not recorded) | |"


def _data_phrase(recipe: dict[str, Any]) -> str:
    sources = recipe.get("datasets") or []
    if not sources:
        return f"`{recipe.get('dataset_name', 'unknown')}`\n({recipe.get('dataset_format', '?')} format)"
    return (
        "a mixture of "
        + ", ".join(
            f"`{Path(s['name']).name if Path(s['name']).exists() else s['name']}` ({s['format']})" for s in sources
        )
        + " (shares below)"
    )


def _mixture_block(mixture: list[dict[str, Any]] | None) -> str:
    """What each source of a mixture became in the training set: asked for, and realised."""
    if not mixture:
        return ""

    def asked(m: dict[str, Any]) -> str:
        if m["asked_share"] is not None:
            return f"{m['asked_share']:.1%}"
        return f"fraction {m['fraction']:g}" if m["fraction"] else "all"

    rows = "\n".join(
        f"| {m['source']} | {m['format']} | {asked(m)} | {m['examples_kept']:,} | {m['examples_used']:,} | "
        f"{m['share_of_examples']:.1%} | {m['share_of_supervised_tokens']:.1%} |"
        for m in mixture
    )
    return (
        "\n## Data mixture\n\n| source | format | asked | examples after cleaning | examples used | share of "
        "examples | share of supervised tokens |\n|---|---|---|---|---|---|---|\n" + rows + "\n"
    )


def _python_string(value: str) -> str:
    """A Python string literal for any path or id: JSON's escapes are Python's, and it keeps double quotes."""
    return json.dumps(value, ensure_ascii=False)


def _unknown_base_note(base: str) -> str:
    return (
        f"\nThe base was a local folder (`{base}`) whose Hub id was not recorded: load your copy of it as `base`"
        " below (`adapter_config.json` names no base, so `AutoPeftModelForCausalLM` cannot find it).\n"
    )


def _load_snippet(
    kind: str, location: str, base: str, quantization: dict[str, Any] | None, base_unknown: bool = False
) -> str:
    prompt = (
        "inputs = tokenizer.apply_chat_template(\n"
        f'    [{{"role": "user", "content": "{EXAMPLE_PROMPT}"}}],\n'
        '    add_generation_prompt=True, return_tensors="pt", return_dict=True,\n'
        ")\n"
        "output = model.generate(**inputs, max_new_tokens=32)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'
    )
    if kind == "merged":
        return (
            "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model_id = {_python_string(location)}\n"
            "tokenizer = AutoTokenizer.from_pretrained(model_id)\n"
            "model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16)\n" + prompt
        )
    base_source = f"path/to/your/copy/of/{base}" if base_unknown else base
    if quantization:
        arguments = ", ".join(
            f"{k}=torch.{v}" if k.endswith(("_dtype", "_storage")) else f"{k}={v!r}" for k, v in quantization.items()
        )
        quantized = (
            "# Trained against this quantized base: load it the same way for outputs closest to training\n"
            "# (needs bitsandbytes), or drop quantization_config for a bf16 base.\n"
            f"quantization_config = BitsAndBytesConfig({arguments})\n"
        )
    else:
        quantized = "quantization_config = None\n"
    return (
        "import torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig\n\n"
        f"adapter = {_python_string(location)}\n"
        + quantized
        + f"base = AutoModelForCausalLM.from_pretrained({_python_string(base_source)}, dtype=torch.bfloat16, "
        "quantization_config=quantization_config)\n"
        "model = PeftModel.from_pretrained(base, adapter)\n"
        "tokenizer = AutoTokenizer.from_pretrained(adapter)\n" + prompt
    )


def _quantization(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The BitsAndBytesConfig arguments training used, read back from the run's recipe.yaml."""
    from hf_lora_recipe.model.loading import quantization_kwargs
    from hf_lora_recipe.recipe.schema import load_recipe_dict

    return quantization_kwargs(load_recipe_dict(recipe)) if recipe else None


def render_card(
    recipe: dict[str, Any],
    results: dict[str, Any],
    location: str,
    kind: str = "adapter",
    merge_base: str | None = None,
    has_plot: bool = False,
    base_unknown: bool = False,
) -> str:
    """The README.md for an adapter (``kind="adapter"``) or a merged model (``kind="merged"``). ``base_unknown``:
    the base was a local folder with no known Hub id (``model_name_or_path`` is then its folder name)."""
    base = recipe.get("model_name_or_path", "unknown")
    quantized = bool(recipe.get("load_in_4bit"))
    # The Hub reads base_model and datasets as repo ids: local paths are named in the text, not the metadata.
    metadata: dict[str, Any] = {}
    if not Path(base).exists() and not base_unknown:
        metadata["base_model"] = base
    metadata["library_name"] = "peft" if kind == "adapter" else "transformers"
    names = [source["name"] for source in recipe.get("datasets") or []] or [recipe.get("dataset_name", "unknown")]
    hub_ids = [name for name in names if not Path(name).exists()]
    if hub_ids:
        metadata["datasets"] = hub_ids
    license_name = base_model_license(base)
    if license_name:
        metadata["license"] = license_name
    metadata["tags"] = ["qlora" if quantized else "lora", "sft", "trl", "hf-lora-recipe"] + (
        ["merged"] if kind == "merged" else []
    )
    evaluation = results.get(EVALUATION)
    index = model_index(evaluation, location, kind) if isinstance(evaluation, dict) else []
    if index:
        metadata["model-index"] = index
    dataset = results.get("dataset", {})
    libraries = results.get("libraries", library_versions())
    what = "LoRA adapter" if kind == "adapter" else "Merged model (base + LoRA adapter)"
    merge_line = f"- merge base: **{merge_base}**\n" if merge_base else ""
    plot = f"\n![training loss]({LOSS_PLOT})\n" if has_plot else ""
    return f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---

# {what} for `{base}`

{"QLoRA" if quantized else "LoRA"} supervised fine-tuning of `{base}` on {_data_phrase(recipe)} with [hf-lora-recipe](https://pypi.org/project/hf-lora-recipe/):
the base is frozen and low-rank adapters `W' = W0 + (alpha/r) B A` are trained on
{", ".join(recipe.get("lora_target_modules", []) + recipe.get("lora_target_parameters", []))}. The full resolved recipe is in `recipe.yaml`.

## Hyperparameters

| setting | value |
|---|---|
{_hyperparameters(recipe) if recipe else "| (recipe.yaml not found) | |"}

## Training results

| metric | value |
|---|---|
{_results(results)}
{_mixture_block(results.get("mixture"))}{plot}{_evaluation_block(evaluation)}
## Prompt template and loss masking

{_template_block(recipe.get("chat_template", "llama2") if recipe else "llama2")}

## Provenance

- dataset: `{dataset.get("name", recipe.get("dataset_name", "unknown"))}` ({dataset.get("version", "version not recorded")})
{_resume_lines(results.get("resumes"))}{merge_line}- libraries: {", ".join(f"{k} {v}" for k, v in libraries.items())}

## How to load
{_unknown_base_note(base) if base_unknown and kind == "adapter" else ""}
```python
{_load_snippet(kind, location, base, _quantization(recipe), base_unknown)}
```
"""


def _resume_lines(resumes: Any) -> str:
    """One line per resume that changed something: the step, the changes, and the data trained on before."""
    lines = []
    for entry in resumes if isinstance(resumes, list) else []:
        before = entry.get("data_before")
        data = (
            f" (steps up to {entry.get('step')} trained on `{before.get('name')}`, {before.get('version')})"
            if isinstance(before, dict)
            else ""
        )
        lines.append(
            f"- resumed at step {entry.get('step')} with changes: {'; '.join(entry.get('changes', []))}{data}\n"
        )
    return "".join(lines)


# ------------------------------------------------------------------------------------------ evaluation
# Rows of the evaluation table: (report key, label, format). Rates as percentages, loss to 4 decimals.
EVALUATION_ROWS = (
    ("response_loss", "response loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:,.2f}"),
    ("stop_rate", "stops at end of turn", "{:.1%}"),
    ("mean_length", "mean length (tokens)", "{:.1f}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("rouge_l", "ROUGE-L F1", "{:.4f}"),
    ("supervised_tokens", "supervised tokens", "{:,}"),
)


def evaluation_cell(key: str, value: Any) -> str:
    """One figure of the evaluation table, as both the console and the card show it."""
    if value is None:
        return "n/a"
    return next(fmt for name, _, fmt in EVALUATION_ROWS if name == key).format(value)


def evaluation_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the evaluation table: one row per metric, one column per model."""
    models = report.get("models", {})
    header = ["metric", *models]
    rows = [
        [label, *(evaluation_cell(key, figures.get(key)) for figures in models.values())]
        for key, label, _ in EVALUATION_ROWS
    ]
    return header, rows


def evaluation_summary(report: dict[str, Any]) -> str:
    """One sentence: what was evaluated, on what, and how."""
    models = " vs ".join(report.get("models", {}))
    return (
        f"{models} on {report.get('num_examples', '?')} examples of `{report.get('dataset', '?')}` "
        f"({report.get('split', '?')}), rendered and masked exactly as in training; greedy decoding, at most "
        f"{report.get('max_new_tokens', '?')} new tokens. Loss and perplexity cover the supervised (response) "
        "tokens; stop rate, length, exact match and ROUGE-L (F1, stemmed) compare the reply generated for the "
        "last user turn with the reference reply."
        + (
            f" **{report['trained_on']} of these examples were in the training data: these are not held-out results.**"
            if report.get("trained_on")
            else ""
        )
    )


def render_evaluation(report: dict[str, Any]) -> str:
    """The ``## Evaluation`` section of a model card, from an ``hf-lora-recipe eval`` report."""
    header, rows = evaluation_rows(report)
    table = "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    return f"{EVALUATION_HEADING}\n\n{evaluation_summary(report)}\n\n{table}\n"


def _evaluation_block(evaluation: Any) -> str:
    return f"\n{render_evaluation(evaluation)}" if isinstance(evaluation, dict) and evaluation.get("models") else ""


METRIC_TYPES = (
    ("perplexity", "perplexity", "perplexity"),
    ("exact_match", "exact_match", "exact match"),
    ("rouge_l", "rouge", "ROUGE-L F1"),
)


def model_index(report: dict[str, Any], location: str, kind: str) -> list[dict[str, Any]]:
    """The Hub's structured results (``model-index``) for this card's own model: the merged figures in a merged
    model's card when they were measured, else the adapter's."""
    models = report.get("models", {})
    if report.get("trained_on"):  # model-index states results on a dataset: never for rows the model trained on
        return []
    figures = models.get("merged") if kind == "merged" and "merged" in models else models.get("adapter")
    if not isinstance(figures, dict):
        return []
    metrics = [
        {"type": metric, "value": round(figures[key], 4), "name": name}
        for key, metric, name in METRIC_TYPES
        if isinstance(figures.get(key), (int, float)) and math.isfinite(figures[key])
    ]
    if not metrics:
        return []
    dataset = str(report.get("dataset", "unknown"))
    dataset_id = Path(dataset).name if Path(dataset).exists() else dataset
    split = str(report.get("split", ""))  # a split's name, or a description of rows held out of one
    return [
        {
            "name": location.rstrip("/").rsplit("/", 1)[-1] or location,
            "results": [
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {
                        "name": dataset_id,
                        "type": dataset_id,
                        **({"split": split} if split.isidentifier() else {}),
                    },
                    "metrics": metrics,
                }
            ],
        }
    ]


def is_our_card(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and OUR_TAG in card_tags(path)


_SECTION = re.compile(rf"^{EVALUATION_HEADING}\n.*?(?=^## |\Z)", re.S | re.M)  # up to the next section
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def _with_metadata(text: str, key: str, value: Any) -> str:
    """``text`` with one metadata key set (or removed when ``value`` is empty); unreadable metadata is left alone."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return text
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return text
    if not isinstance(metadata, dict):
        return text
    if value:
        metadata[key] = value
    else:
        metadata.pop(key, None)
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False).strip()}\n---\n" + text[match.end() :]


def write_evaluation(directory: Path, report: dict[str, Any]) -> str | None:
    """Record an evaluation in a card we wrote: the ``## Evaluation`` section (replaced when present), the
    model-index metadata, and ``training_results.json``'s ``evaluation`` key, from which ``push`` re-renders the
    card. Returns why nothing was written, or None. A card we did not write is never touched."""
    card = directory / CARD
    if not is_our_card(card):
        return f"{card} is not a model card written by hf-lora-recipe: left as it is"
    results_path = directory / RESULTS_FILE
    if results_path.is_file() and not results_path.is_symlink():
        try:
            results = json.loads(results_path.read_text())
        except ValueError:
            results = None
    else:
        results = None
    text = card.read_text(encoding="utf-8")
    section = render_evaluation(report)
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section + "\n", text, count=1)
    else:
        # where render_card puts it: after the training results, before the prompt template (else at the end)
        anchor = text.find("\n## Prompt template") + 1
        text = text[:anchor] + section + "\n" + text[anchor:] if anchor else text.rstrip("\n") + "\n\n" + section
    kind = "merged" if "merged" in card_tags(card) else "adapter"
    location = str(directory.resolve())
    text = _with_metadata(text, "model-index", model_index(report, location, kind))
    texts = {card: text}
    if isinstance(results, dict):
        texts[results_path] = json.dumps({**results, EVALUATION: report}, indent=2) + "\n"
    write_texts_atomically(texts)  # both or neither: push re-renders the card from the results
    return None


def write_card(directory: Path, location: str, kind: str = "adapter", merge_base: str | None = None) -> None:
    recipe, results = read_run(directory)
    card = render_card(recipe, results, location, kind, merge_base, has_plot=(directory / LOSS_PLOT).is_file())
    write_text_atomically(directory / "README.md", card)


def plot_losses(log_history: list[dict[str, Any]], path: Path) -> bool:
    """Training (and eval) loss against optimizer step, as a PNG; False when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(*zip(*train), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
