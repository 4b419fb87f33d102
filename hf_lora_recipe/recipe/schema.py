"""The recipe: one schema, one parser, one precedence.

Precedence, lowest to highest: the seed defaults below < the recipe YAML < ``--key value`` flags.
Field names follow TRL (``SFTConfig``, ``ModelConfig``, ``ScriptArguments``) wherever TRL has the concept,
so a TRL user reads a recipe without a glossary. Each field carries its help text and group in
``metadata``: :mod:`hf_lora_recipe.recipe.cli_args` builds the command line (and ``--help``) from them, so the
explanation a user reads is the one written here. This module imports nothing else of ours: everything
downstream reads a validated :class:`Recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


# The seed's targets are an intent, resolved per architecture on the meta device (model/architecture.py): on a
# Llama these are the seven LLAMA_PROJECTIONS
ALL_PROJECTIONS = "all-projections"
SEED_TARGET_MODULES = [ALL_PROJECTIONS]
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer of the decoder, never the LM head
SHORTHANDS = {ALL_PROJECTIONS: "every attention and MLP projection", ALL_LINEAR: "every linear layer"}
FAMILY_FORMATS = ("chatml", "llama3", "gemma", "mistral", "phi3")  # their templates: templates/formats.py
CHAT_TEMPLATES = ("llama2", "native", *FAMILY_FORMATS)  # or a path to a .jinja file
DATASET_FORMATS = ("alpaca", "oasst", "prompt_completion", "messages", "auto")
LORAPLUS_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")  # torch.optim.AdamW, which create_loraplus_optimizer builds


class RecipeError(ValueError):
    """A recipe (or any other user input) that cannot run: raised before anything heavy is loaded."""


@dataclass(frozen=True)
class KeyPlugins:
    """A recipe key whose values a later stage defines (``init_lora_weights``: the LoRA inits in ``inits/``): the
    values ``--help`` lists, and the check that refuses, at load, a value or what it cannot run with."""

    key: str
    names: Callable[[], list[str]]
    check: Callable[[Recipe], None]


GROUPS: list[str] = []  # in the order --help shows them


@dataclass(frozen=True)
class Bounds:
    """The values a numeric key accepts: from ``low`` to ``high`` (None: unbounded), each end in or out."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or value > self.low or (self.low_inclusive and value == self.low)
        below = self.high is None or value < self.high or (self.high_inclusive and value == self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            if (self.low, self.low_inclusive) in ((0, False), (1, True)):
                return "positive"
            return f"{'>=' if self.low_inclusive else '>'} {_number_text(self.low)}"
        low, high = _number_text(self.low), _number_text(self.high)
        return f"in {'[' if self.low_inclusive else '('}{low}, {high}{']' if self.high_inclusive else ')'}"


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE = Bounds(0, low_inclusive=False)  # a float > 0
COUNT = Bounds(1)  # an int >= 1
NON_NEGATIVE = Bounds(0)
FRACTION = Bounds(0, 1)  # [0, 1)
SHARE = Bounds(0, 1, low_inclusive=False, high_inclusive=True)  # (0, 1]


# What a resume may change, per key (``resume`` in a field's metadata; see training/run_identity.py):
REFUSE = "refuse"  # the checkpoint's adapter or optimizer state would not mean the same: refused
ALLOW = "allow"  # how the run is carried out or reported: allowed, and recorded in the card
DATA = "data"  # what the run reads: refused unless allow_data_change, then recorded


def _group(title: str, resume: str = REFUSE) -> Callable[..., Any]:
    """A field factory whose fields carry ``title`` as their --help group and, unless they say otherwise, the
    group's ``resume`` policy."""
    GROUPS.append(title)
    group_resume = resume

    def knob(
        default: Any,
        help: str,  # noqa: A002 - argparse's name
        choices: tuple[str, ...] | None = None,
        bounds: Bounds | None = None,
        resume: str = group_resume,
    ) -> Any:
        metadata = {"help": help, "group": title, "choices": choices, "bounds": bounds, "resume": resume}
        if isinstance(default, list):
            return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
        return dataclasses.field(default=default, metadata=metadata)

    return knob


model = _group("model")
quantization = _group("QLoRA: base quantization (bitsandbytes)")
lora = _group("LoRA (peft.LoraConfig)")
data = _group("data", resume=DATA)
speed = _group("speed", resume=ALLOW)
batch = _group("batch", resume=ALLOW)
optimisation = _group("optimisation (trl.SFTConfig)")
output = _group("output, checkpoints, logging and publishing", resume=ALLOW)


@dataclass
class Recipe:
    """Every knob of a run. The defaults *are* the seed recipe; nothing else in the package restates them."""

    # a resume compares the base itself (its config and weights), not the name it was reached by
    model_name_or_path: str = model(
        "meta-llama/Meta-Llama-3-8B", "base model: a Hub id or a local folder", resume=ALLOW
    )
    model_revision: str = model("main", "Hub revision (branch, tag or commit) of the base", resume=ALLOW)
    trust_remote_code: bool = model(
        False, "run Python code shipped with the model repo (opt-in: it executes code)", resume=ALLOW
    )
    attn_implementation: str = model(
        "auto",
        "attention kernel: auto = varlen for padding-free rows on a CPU-only machine, else sdpa; sdpa; varlen "
        "(padding-free without flash-attn: PyTorch's varlen flash kernel on CUDA, each packed example on its own "
        "on a CPU-only machine); flex_attention; flash_attention_2 when flash-attn is installed (falls back to "
        "sdpa otherwise)",
        resume=ALLOW,
    )

    load_in_4bit: bool = quantization(
        True, "QLoRA: load the frozen base in 4 bits (false: a bf16/fp32 base, plain LoRA)"
    )
    bnb_4bit_quant_type: str = quantization(
        "nf4", "4-bit data type; NF4 suits normally distributed weights", ("nf4", "fp4")
    )
    use_bnb_nested_quant: bool = quantization(
        True, "double quantization of the block constants (~0.4 bit/param saved; TRL's default is false)"
    )
    bnb_4bit_compute_dtype: str = quantization(
        "bfloat16", "dtype the 4-bit weights are dequantized to for matmuls", ("bfloat16", "float16", "float32")
    )
    bnb_4bit_quant_storage: str = quantization(
        "bfloat16",
        "storage dtype of the packed weights; the compute dtype lets FSDP shard them like any tensor",
        ("bfloat16", "float16", "float32", "uint8"),
    )
    kbit_upcast_fp32: bool = quantization(
        False,
        "PEFT's k-bit preparation: upcast embeddings, norms and LM head to fp32 (a guard for fp16); off: the seed "
        "keeps them bf16, which costs less memory and time (docs/speed.md)",
    )

    lora_r: int = lora(16, "adapter rank r: W' = W0 + (alpha/r) B A", bounds=COUNT)
    lora_alpha: int = lora(32, "scale numerator; 2r (alpha == r under-uses the adapter)", bounds=COUNT)
    lora_dropout: float = lora(0.05, "dropout on the adapter's input", bounds=FRACTION)
    lora_target_modules: list[str] = lora(
        SEED_TARGET_MODULES,
        f"module names to adapt (space- or comma-separated); {ALL_PROJECTIONS}: every attention and MLP "
        f"projection of the architecture (MoE experts through lora_target_parameters, routers frozen), resolved "
        f"and recorded in recipe.yaml; {ALL_LINEAR}: PEFT's every linear layer; never embeddings, norms or the LM head",
    )
    lora_target_parameters: list[str] = lora(
        [],
        "3-D parameters to adapt, by their name inside a decoder layer (PEFT target_parameters), e.g. "
        f"mlp.experts.gate_up_proj: MoE experts stored fused; {ALL_PROJECTIONS} fills it for MoE families",
    )
    use_rslora: bool = lora(
        False, "rank-stabilised LoRA: scale B A by alpha/sqrt(r) instead of alpha/r (PEFT use_rslora)"
    )
    use_dora: bool = lora(
        False,
        "DoRA: a trained magnitude per output row beside B A (PEFT use_dora); more memory "
        "and compute (plan counts them)",
    )
    init_lora_weights: str = lora(
        "true",
        "adapter initialisation (PEFT init_lora_weights); every one starts at the base's outputs. What each does "
        "and refuses: docs/variants.md",
    )

    dataset_name: str = data(
        "tatsu-lab/alpaca", "Hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder"
    )
    datasets: list[dict] = data(
        [],
        "several sources mixed into one training set, instead of dataset_name: a list of {name, format, split, "
        "config, revision, weight or fraction} (on the command line, one YAML mapping per value). weight: the chance "
        "each next example comes from that source (datasets.interleave_datasets, seeded); fraction: the share of that "
        "source's examples taken (then concatenated); neither: every example of every source",
    )
    mixture_stopping_strategy: str = data(
        "first_exhausted",
        "weighted mixtures: stop when the first source runs out (no example repeats), when all "
        "have (smaller sources repeat), or when all have without repeating any (the last draws follow what is left, "
        "not the weights); datasets.interleave_datasets' stopping_strategy",
        ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement"),
    )
    dataset_config: str | None = data(None, "Hub dataset configuration name")
    dataset_revision: str | None = data(None, "Hub dataset revision")
    dataset_train_split: str = data("train", "split to train on")
    dataset_test_split: str | None = data(None, "a named held-out split, for eval loss")
    eval_split_size: float = data(
        0.0, "or hold out this share (< 1) or count (>= 1) of the training rows", bounds=NON_NEGATIVE
    )
    dataset_format: str = data("alpaca", "row layout; auto picks the one format the columns fit", DATASET_FORMATS)
    on_bad_rows: str = data(
        "error", "a row with a missing/null/empty field stops the run, or is dropped and counted", ("error", "skip")
    )
    oasst_languages: list[str] = data(
        [], "OpenAssistant: keep trees whose root prompt is in these languages (e.g. en de); empty keeps all"
    )
    oasst_all_paths: bool = data(False, "OpenAssistant: every root-to-leaf path instead of the best-ranked one")
    streaming: bool = data(
        False,
        "read, tokenize and audit the training rows as training consumes them (no Arrow copy; Hub datasets "
        "too large for the disk; local JSON Lines and parquet row by row): needs max_steps; the first rows are checked "
        "before loading, a resume re-reads the stream up to where the checkpoint stopped",
    )
    max_length: int = data(512, "tokens per example; longer ones are truncated (the start is kept)", bounds=COUNT)
    chat_template: str = data(
        "llama2",
        "prompt format: llama2 (the seed's <s>[INST] ... [/INST] ... </s>), native (the tokenizer's own chat "
        f"template), a family's format ({', '.join(FAMILY_FORMATS)}; docs/architectures.md) or a path to a .jinja "
        "chat template",
        resume=REFUSE,
    )
    train_template_tokens: bool = data(
        False,
        "also train the embedding (and LM-head) rows of the special tokens the template uses (PEFT "
        "trainable_token_indices): the way out when a base model never trained its chat tokens",
        resume=REFUSE,
    )
    completion_only_loss: bool = data(
        True,
        "loss on responses and their EOS only; false also trains on prompts (the model learns to echo)",
        resume=REFUSE,
    )

    padding_free: str = speed(
        "auto",
        "concatenate examples into one row with restarting position ids (no padding); "
        "auto = on for CPU, and on GPUs with varlen, flex or flash attention",
        ("auto", "true", "false"),
    )
    train_sampling_strategy: str = speed(
        "random",
        "group_by_length puts similar lengths together (less padding)",
        ("random", "sequential", "group_by_length"),
        resume=DATA,  # the order the rows are read in
    )
    use_liger_kernel: bool = speed(
        False, "Liger's fused RMSNorm/SwiGLU/RoPE kernels on CUDA (pip install hf-lora-recipe[fast])"
    )
    activation_offloading: bool = speed(
        False,
        "move the activations checkpointing keeps to CPU memory during forward, back for backward (TRL's "
        "activation_offloading): the memory-lean setting, same numbers",
    )
    compile: bool = speed(
        False,
        "torch.compile each decoder layer (bitsandbytes 4-bit, LoRA and its dropout inside): "
        "fewer kernel launches once compiled; the first steps pay the compile time",
    )
    lm_head_loss: str = speed(
        "auto",
        "fused = TRL's tiled LM-head loss (never builds the full logits); plain = the "
        "model's cross-entropy; auto = fused on GPU only (same loss either way)",
        ("auto", "fused", "plain"),
    )

    global_batch_size: int = batch(
        128,
        "examples per optimizer step across all processes; gradient accumulation is derived from it, never typed",
        bounds=COUNT,
        resume=REFUSE,
    )
    per_device_train_batch_size: int | str = batch(
        4,
        "micro-batch per process, or auto: the largest that divides the global batch and whose peak, as `plan` "
        "estimates it, fits memory_budget_gb (accumulation re-derived: the math is unchanged)",
        bounds=COUNT,
    )
    memory_budget_gb: float | None = batch(
        None,
        "memory per process that auto micro-batch may plan for; default 90% of the GPU's free memory "
        "(on a CPU: half the available RAM)",
        bounds=POSITIVE,
    )

    learning_rate: float = optimisation(3e-4, "peak learning rate", bounds=POSITIVE)
    loraplus_lr_ratio: float | None = optimisation(
        None,
        "LoRA+: the B matrices learn at learning_rate x this ratio (PEFT's create_loraplus_optimizer; the "
        "paper suggests 16); null: one learning rate",
        bounds=POSITIVE,
    )
    lr_scheduler_type: str = optimisation("cosine", "transformers scheduler name; cosine decays to 0 at the last step")
    warmup_steps: float = optimisation(
        0.0, "warm-up steps; < 1 is a fraction of the run; the seed has none", bounds=NON_NEGATIVE
    )
    num_train_epochs: float = optimisation(3.0, "passes over the training set", bounds=NON_NEGATIVE, resume=ALLOW)
    max_steps: int = optimisation(
        -1,
        "> 0 stops after this many optimizer steps (overrides num_train_epochs); -1: none",
        bounds=Bounds(-1),
        resume=ALLOW,
    )
    optim: str = optimisation("adamw_torch", "transformers optimizer name")
    adam_beta1: float = optimisation(0.9, "AdamW beta1", bounds=FRACTION)
    adam_beta2: float = optimisation(0.999, "AdamW beta2", bounds=FRACTION)
    weight_decay: float = optimisation(
        0.0, "AdamW weight decay (the adapter starts at B = 0: no decay needed)", bounds=NON_NEGATIVE
    )
    max_grad_norm: float = optimisation(1.0, "gradient-norm clip (0: none)", bounds=NON_NEGATIVE)
    bf16: bool = optimisation(True, "bf16 weights and autocast (false: fp32)")
    gradient_checkpointing: bool = optimisation(
        True, "recompute activations in backward: ~30% slower, ~10x less activation memory", resume=ALLOW
    )
    seed: int = optimisation(
        42, "seeds data order, dropout and the adapter's A matrices", bounds=Bounds(0, 2**32 - 1, high_inclusive=True)
    )

    output_dir: str = output("outputs/run", "where checkpoints and the final adapter go")
    logging_steps: int = output(10, "log loss every N optimizer steps", bounds=COUNT)
    eval_steps: int = output(200, "evaluate every N steps (with a held-out set)", bounds=COUNT)
    final_eval_examples: int = output(
        100,
        "after training, run `hf-lora-recipe eval` (base vs adapter: loss, stop rate, exact match, ROUGE-L) on "
        "this many held-out examples when a held-out set exists; 0 skips it",
        bounds=NON_NEGATIVE,
    )
    save_steps: int = output(200, "checkpoint every N steps", bounds=COUNT)
    save_total_limit: int = output(2, "checkpoints kept", bounds=COUNT)
    resume_from_checkpoint: str | None = output(
        None, "a checkpoint folder, or true (the latest); by default a rerun resumes from the latest by itself"
    )
    overwrite_output_dir: bool = output(False, "start fresh even though output_dir holds checkpoints")
    report_to: list[str] = output(
        ["none"],
        "trackers for the training metrics, as transformers names them (tensorboard, trackio, wandb, ...; all; none)",
    )
    push_to_hub: bool = output(False, "push the adapter (never checkpoints) to hub_model_id when training ends")
    hub_model_id: str | None = output(None, "Hub repo for push_to_hub, e.g. your-name/llama3-8b-alpaca-qlora")
    hub_private_repo: bool = output(False, "create the Hub repo private")
    base_model_id: str | None = output(
        None,
        "the base's Hub id when model_name_or_path is a local folder: what a pushed adapter and its card name as "
        "its base (else they name none)",
    )
    allow_data_change: bool = output(
        False,
        "resume from a checkpoint trained on other data (other files, sources or split): the card records both",
    )


# Written to recipe.yaml under ``derived:`` for the record; re-derived (never read back) on the next run.
DERIVED_KEYS = ("gradient_accumulation_steps", "world_size")

FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Recipe)}
FIELD_TYPES: dict[str, Any] = get_type_hints(Recipe)


AUTO = "auto"  # the value an ``int | str`` field takes instead of a number: resolved at launch (see training/auto_micro_batch.py)


def accepts_auto(name: str) -> bool:
    """An ``int | str`` field: a number, or auto."""
    return set(get_args(FIELD_TYPES[name])) == {int, str}


def field_type(name: str) -> tuple[Any, bool]:
    """(the field's base type, whether it may be null); an ``int | str`` field is an int that may also be auto."""
    hint = FIELD_TYPES[name]
    if accepts_auto(name):
        return int, False
    optional = type(None) in get_args(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if optional else hint
    return base, optional


def is_list(name: str) -> bool:
    return get_origin(field_type(name)[0]) is list


def nearest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return match[0] if match else candidates[0]


def unknown_key_error(key: str, where: str) -> RecipeError:
    if key in DERIVED_KEYS:
        return RecipeError(
            f"{key} ({where}) is derived, never typed: set global_batch_size and per_device_train_batch_size"
        )
    return RecipeError(f"unknown recipe key {key!r} ({where}); did you mean {nearest(key, list(FIELDS))!r}?")


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML value or command-line string(s) into the field's declared type."""
    base, optional = field_type(name)
    if accepts_auto(name) and str(value).lower() == AUTO:
        return AUTO
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise RecipeError(f"{name} must not be null")
    if base == list[dict]:
        return [_mapping(name, item) for item in (value if isinstance(value, list) else [value])]
    try:
        if get_origin(base) is list:
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise TypeError
            # "q_proj v_proj" (several flag values), "q_proj,v_proj" and YAML lists all mean the same
            return [part.strip() for item in items for part in item.split(",") if part.strip()]
        if base is bool:
            return parse_bool(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if math.isfinite(number):
                return number
            # NaN compares false with every bound, so no later check would catch it
            raise RecipeError(f"{name}: {value!r} is not a finite number; give a number")
        if base is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except RecipeError:
        raise
    except (TypeError, ValueError):
        pass
    auto = f" or {AUTO}" if accepts_auto(name) else ""
    raise RecipeError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)}{auto}")


def _mapping(name: str, item: Any) -> dict:
    """One entry of a list-of-mappings key: a YAML mapping, or (a command-line value) its flow text ``{a: 1}``."""
    if isinstance(item, str):
        try:
            item = yaml.safe_load(item)
        except yaml.YAMLError:
            pass
    if not isinstance(item, dict):
        raise RecipeError(f"{name}: each entry is a mapping like {{name: data.jsonl, weight: 0.5}}; got {item!r}")
    return item


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error instead of the last one silently winning."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise RecipeError(f"{loader.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: Path) -> Any:
    """A YAML file, with its name and line in every error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise RecipeError(f"{path}: cannot read ({error.strerror})") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise RecipeError(f"{path}: {where}: invalid YAML ({error.problem})") from None
    finally:
        loader.dispose()


def load_recipe(config_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Seed defaults < YAML at ``config_path`` < ``overrides``; validated before anything heavy happens."""
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path).expanduser()
        if path.is_dir():
            raise RecipeError(f"--config {path} is a folder: give the recipe's YAML file (e.g. recipes/NAME.yaml)")
        if not path.is_file():
            raise RecipeError(f"recipe not found: {path}")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of key: value")
        for key in loaded:
            if key not in FIELDS and key != "derived":
                raise unknown_key_error(str(key), f"in {path}")
        values.update(loaded)
    overrides = overrides or {}
    for key in overrides:
        if key not in FIELDS:
            raise unknown_key_error(key, "in overrides")
    # the command line wins over the file: data given one way there replaces the file's data given the other way
    if "datasets" in overrides:
        for key in SINGLE_DATASET_KEYS:
            values.pop(key, None)
    elif any(key in overrides for key in SINGLE_DATASET_KEYS):
        values.pop("datasets", None)
    values.update(overrides)
    return load_recipe_dict(values)


def load_recipe_dict(values: dict[str, Any]) -> Recipe:
    """A validated recipe from ``key: value`` pairs (e.g. a saved ``recipe.yaml``); ``derived`` is ignored."""
    unknown = [key for key in values if key not in FIELDS and key != "derived"]
    if unknown:
        raise unknown_key_error(str(unknown[0]), "in the recipe")
    recipe = Recipe(**{key: _coerce(key, value) for key, value in values.items() if key != "derived"})
    normalise_paths(recipe)
    normalise_sources(recipe)
    validate(recipe)
    return recipe


def normalise_paths(recipe: Recipe) -> None:
    """Expand ``~`` and make ``output_dir`` absolute, once, so every step (checkpoints, the final adapter, the
    card) writes to the same place whatever it does with the path."""
    recipe.output_dir = os.path.abspath(os.path.expanduser(recipe.output_dir))
    resume = recipe.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "false"):
        recipe.resume_from_checkpoint = os.path.abspath(os.path.expanduser(resume))
    if recipe.chat_template.endswith(".jinja"):
        recipe.chat_template = os.path.abspath(os.path.expanduser(recipe.chat_template))
    for name in ("model_name_or_path", "dataset_name"):
        value = getattr(recipe, name)
        if value.startswith("~"):
            setattr(recipe, name, os.path.expanduser(value))


SOURCE_KEYS = ("name", "format", "split", "config", "revision", "weight", "fraction")


def _number(where: str, key: str, value: Any, upper: float | None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
        or (upper and value > upper)
    ):
        bound = f"in (0, {upper:g}]" if upper else "> 0"
        raise RecipeError(f"{where}: {key} must be a number {bound}; got {value!r}")
    return float(value)


def _source(recipe: Recipe, index: int, entry: dict) -> dict:
    """A ``datasets`` entry with every key filled in (the single-dataset keys give the defaults)."""
    where = f"datasets[{index}]"
    for key in entry:
        if key not in SOURCE_KEYS:
            raise RecipeError(
                f"{where}: unknown key {key!r}; did you mean {nearest(str(key), list(SOURCE_KEYS))!r}? "
                f"(keys: {', '.join(SOURCE_KEYS)})"
            )
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{where}: name (a Hub dataset id or a local file or folder) is missing")
    source = {
        "name": os.path.expanduser(name) if name.startswith("~") else name,
        "format": str(entry.get("format", recipe.dataset_format)),
        "split": str(entry.get("split", "train")),
        "config": entry.get("config"),
        "revision": entry.get("revision"),
        "weight": None,
        "fraction": None,
    }
    if source["format"] not in DATASET_FORMATS:
        raise RecipeError(f"{where}: format must be one of {', '.join(DATASET_FORMATS)}; got {source['format']!r}")
    for key in ("config", "revision"):
        source[key] = None if source[key] is None else str(source[key])
    if entry.get("weight") is not None and entry.get("fraction") is not None:
        raise RecipeError(f"{where}: give weight or fraction, not both")
    if entry.get("weight") is not None:
        source["weight"] = _number(where, "weight", entry["weight"], None)
    if entry.get("fraction") is not None:
        source["fraction"] = _number(where, "fraction", entry["fraction"], 1.0)
    return source


SINGLE_DATASET_KEYS = (
    "dataset_name",
    "dataset_config",
    "dataset_revision",
    "dataset_train_split",
    "dataset_test_split",
)


def normalise_sources(recipe: Recipe) -> None:
    """Fill in every ``datasets`` entry and check the mixture as a whole: one way of mixing for all sources."""
    if not recipe.datasets:
        return
    defaults = Recipe.__dataclass_fields__
    given = [key for key in SINGLE_DATASET_KEYS if getattr(recipe, key) != defaults[key].default]
    if given:
        raise RecipeError(
            f"datasets replaces {given[0]}: give the data either as datasets (each entry with its own "
            "name, split, config, revision) or as dataset_name, not both; to hold out examples of a "
            "mixture use eval_split_size"
        )
    recipe.datasets = [_source(recipe, index, entry) for index, entry in enumerate(recipe.datasets)]
    kinds = {
        ("weight" if s["weight"] is not None else "fraction" if s["fraction"] is not None else "neither")
        for s in recipe.datasets
    }
    if len(kinds) > 1:
        raise RecipeError(
            f"datasets: every entry gives a weight, or every entry a fraction, or none does; got a mix "
            f"({', '.join(sorted(kinds))})"
        )
    seen: dict[tuple, int] = {}
    for index, source in enumerate(recipe.datasets):
        path = Path(source["name"]).expanduser()
        where = str(path.resolve()) if path.exists() else source["name"]  # one file by two paths is one source
        key = (where, source["split"], source["config"])
        if key in seen:
            first = recipe.datasets[seen[key]]["name"]
            same = "" if first == source["name"] else f" (the same data as datasets[{seen[key]}], {first})"
            raise RecipeError(
                f"datasets[{index}]: {source['name']} ({source['split']}) is listed twice{same}; give it once "
                "with the weight or fraction it should have"
            )
        seen[key] = index


def validate(recipe: Recipe) -> None:
    """Every key on its own and the keys together; a key whose values a later stage defines (``KeyPlugins``) is
    checked by that stage's check, which the recipe's parser runs next."""
    for name, spec in FIELDS.items():
        choices, bounds = spec.metadata.get("choices"), spec.metadata.get("bounds")
        value = getattr(recipe, name)
        if choices and value not in choices:
            raise RecipeError(f"{name} must be one of {', '.join(choices)}; got {getattr(recipe, name)!r}")
        if bounds and value is not None and value != AUTO and not bounds.holds(value):
            raise RecipeError(f"{name} must be {bounds}; got {value}")
    if recipe.max_steps == 0 or (recipe.max_steps < 0 and recipe.num_train_epochs == 0):
        raise RecipeError(
            f"the recipe trains nothing (max_steps {recipe.max_steps}, num_train_epochs {recipe.num_train_epochs:g}); "
            "set num_train_epochs > 0 or max_steps > 0"
        )
    if recipe.eval_split_size >= 1 and not float(recipe.eval_split_size).is_integer():
        raise RecipeError(
            f"eval_split_size {recipe.eval_split_size:g} is neither a share (< 1) nor a whole count of rows; "
            f"give {recipe.eval_split_size - int(recipe.eval_split_size):g} of the rows or {int(recipe.eval_split_size)} rows"
        )
    if recipe.eval_split_size and recipe.dataset_test_split:
        raise RecipeError("set either eval_split_size (>= 0) or dataset_test_split, not both")
    if recipe.chat_template not in CHAT_TEMPLATES and not recipe.chat_template.endswith(".jinja"):
        raise RecipeError(
            f"chat_template must be {' or '.join(CHAT_TEMPLATES)} or a path to a .jinja file; "
            f"got {recipe.chat_template!r}"
        )
    if not recipe.lora_target_modules:
        raise RecipeError("lora_target_modules is empty: LoRA would train nothing")
    for shorthand, meaning in SHORTHANDS.items():
        if shorthand in recipe.lora_target_modules and len(recipe.lora_target_modules) > 1:
            raise RecipeError(f"lora_target_modules: {shorthand} already means {meaning}; give it alone")
    if recipe.push_to_hub and not recipe.hub_model_id:
        raise RecipeError("push_to_hub: true needs hub_model_id (e.g. your-name/llama3-8b-alpaca-qlora)")
    if len(recipe.report_to) > 1 and {"none", "all"} & set(recipe.report_to):
        raise RecipeError(f"report_to: none and all stand alone; got {' '.join(recipe.report_to)}")
    if recipe.loraplus_lr_ratio is not None and recipe.optim not in LORAPLUS_OPTIMIZERS:
        raise RecipeError(
            f"loraplus_lr_ratio works with optim {' or '.join(LORAPLUS_OPTIMIZERS)} (PEFT builds the "
            f"optimizer itself); got optim {recipe.optim}"
        )
    if recipe.streaming:
        check_streaming(recipe)
    # Divisibility for one process is checked here; the launcher's world size is checked again at train time.
    if recipe.per_device_train_batch_size != AUTO:
        gradient_accumulation_steps(recipe, world_size=1)


def check_streaming(recipe: Recipe) -> None:
    """What a stream (no length, read once in order) cannot do, refused with the way out."""
    if recipe.max_steps <= 0:
        raise RecipeError(
            "streaming: true needs max_steps > 0 (a stream has no length to count epochs in); e.g. "
            "max_steps = examples to train on / global_batch_size"
        )
    if recipe.eval_split_size:
        raise RecipeError(
            "streaming: eval_split_size needs the whole training set to hold rows out of; name a held-out "
            "split with dataset_test_split (it is read whole) or set eval_split_size 0"
        )
    if recipe.datasets:
        raise RecipeError(
            "streaming: a datasets mixture is prepared and mixed whole; stream one dataset_name, or set "
            "streaming false"
        )
    if recipe.dataset_format == "oasst":
        raise RecipeError(
            "streaming: OpenAssistant trees must be read whole to pick their conversations; use "
            "dataset_format messages (conversations already picked) or streaming false"
        )
    if recipe.train_sampling_strategy == "group_by_length":
        raise RecipeError(
            "streaming: group_by_length sorts the whole set by length; use random (a seeded shuffle "
            "buffer) or sequential"
        )


def gradient_accumulation_steps(recipe: Recipe, world_size: int) -> int:
    """global_batch_size / (per_device_train_batch_size x world_size), which must be a whole number."""
    per_step = recipe.per_device_train_batch_size * world_size
    steps, remainder = divmod(recipe.global_batch_size, per_step)
    if remainder or steps == 0:
        raise RecipeError(
            f"global_batch_size {recipe.global_batch_size} is not a whole multiple of "
            f"per_device_train_batch_size {recipe.per_device_train_batch_size} x world size {world_size} "
            f"= {per_step}; choose a micro-batch or process count that divides it"
        )
    return steps


def peft_target_modules(recipe: Recipe) -> list[str] | str:
    """``lora_target_modules`` as PEFT takes it: a list of names, or the string ``all-linear``. The seed's
    intent is resolved before (model/architecture.py: with_projections)."""
    if recipe.lora_target_modules == [ALL_PROJECTIONS]:
        raise RuntimeError(f"lora_target_modules {ALL_PROJECTIONS} reached PEFT unresolved")
    return ALL_LINEAR if recipe.lora_target_modules == [ALL_LINEAR] else list(recipe.lora_target_modules)


def recipe_to_dict(recipe: Recipe, **derived: Any) -> dict[str, Any]:
    """The fully resolved recipe, plus derived values (e.g. gradient_accumulation_steps) for ``recipe.yaml``."""
    resolved = dataclasses.asdict(recipe)
    if derived:
        resolved["derived"] = derived
    return resolved


def dump_recipe(recipe: Recipe, path: str | os.PathLike, **derived: Any) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe, **derived), sort_keys=False))


def saved_recipe(location: str | os.PathLike) -> Recipe | None:
    """The recipe a run saved with its adapter or merged model (``recipe.yaml`` in a folder or a Hub repo);
    None for one trained elsewhere, which has none."""
    path = Path(location) / "recipe.yaml"
    if not path.is_file():
        if Path(location).is_dir():
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(location), "recipe.yaml"))
        except Exception:  # noqa: BLE001 - not found, offline, or not a repo: there is no recipe to read
            return None
    return load_recipe(path)
