"""Base vs adapter (vs merged) on held-out data rendered exactly as in training: loss and generations."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.recipe.schema import AUTO, Recipe, RecipeError, saved_recipe


DEFAULT_NUM_EXAMPLES = 100
DEFAULT_MAX_NEW_TOKENS = 256  # the cap on the reply budget sized from the references
REPLY_BUDGET_QUANTILE, REPLY_BUDGET_MARGIN = 0.95, 1.25  # most references fit, with a quarter to spare
DEFAULT_BATCH_SIZE = AUTO  # from memory: eval_batch_sizes
# Past this many examples a batch buys little on either device, and the progress bar would say little.
EVAL_BATCH_CAP = 64
METRICS = (
    "response_loss",
    "perplexity",
    "stop_rate",
    "mean_length",
    "exact_match",
    "rouge_l",
    "num_examples",
    "supervised_tokens",
)


# ---------------------------------------------------------------------------------------------- batch sizes


@dataclass(frozen=True)
class EvalBatches:
    """Examples per scoring forward and per generate call, and the memory they were sized within."""

    scoring: int
    generation: int
    budget_bytes: int = 0
    budget_source: str = ""

    def line(self) -> str:
        from hf_lora_recipe.planning.estimates import GIB

        return (
            f"eval batch auto -> scoring {self.scoring}, generation {self.generation} examples per pass, within "
            f"{self.budget_bytes / GIB:.2f} GiB ({self.budget_source})"
        )


def eval_batch_sizes(
    config: Any, examples: list[Example], max_new_tokens: int, compute_bytes: int, budget_bytes: int
) -> tuple[int, int]:
    """(scoring, generation) examples per pass whose working memory fits ``budget_bytes`` beside the loaded
    model, at most :data:`EVAL_BATCH_CAP` and the number of examples, at least 1. Without gradients a pass holds
    one layer's transients at a time (projections' outputs, the MLP's, the attention scores), plus: scoring, the
    full logits and the loss's fp32 copies of them (the training loss's bytes per logit); generation, the KV
    cache over prompt and reply and the prompt's logits (families without ``logits_to_keep`` compute them all)."""
    from hf_lora_recipe.planning.estimates import PLAIN_LOSS_BYTES_PER_LOGIT, attention_widths

    text = config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    heads, kv_dim = attention_widths(text)
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden

    def layer_transients(length: int) -> int:
        return length * compute_bytes * (4 * hidden + 2 * kv_dim + 3 * intermediate) + 4 * heads * length**2

    longest = max(len(example.input_ids) for example in examples)
    prompt = max(len(example.prompt_ids) for example in examples)
    scoring = longest * vocab * PLAIN_LOSS_BYTES_PER_LOGIT + layer_transients(longest)
    cache = 2 * text.num_hidden_layers * kv_dim * compute_bytes * (prompt + max_new_tokens)
    generation = cache + layer_transients(prompt) + 4 * vocab * prompt

    def fitting(per_example: int) -> int:
        return max(1, min(EVAL_BATCH_CAP, len(examples), budget_bytes // per_example))

    return fitting(scoring), fitting(generation)


def resolve_eval_batches(
    recipe: Recipe,
    model: Any,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int | str,
    say: Any = log.info,
) -> EvalBatches:
    """``batch_size`` for both passes, or with ``auto`` each sized by :func:`eval_batch_sizes` within the memory
    ``per_device_train_batch_size: auto`` plans for (the recipe's ``memory_budget_gb``, else 90% of the GPU's
    free memory with the model loaded, on a CPU half the available RAM); logged."""
    if batch_size != AUTO:
        return EvalBatches(int(batch_size), int(batch_size))
    from hf_lora_recipe.training.auto_micro_batch import memory_budget

    budget, source = memory_budget(recipe)
    scoring, generation = eval_batch_sizes(model.config, examples, max_new_tokens, 2 if recipe.bf16 else 4, budget)
    batches = EvalBatches(scoring, generation, budget, source)
    say(batches.line())
    return batches


def scoring_options(
    recipe: Recipe, model: Any, examples: list[Example], max_new_tokens: int, batch_size: int | str, say: Any
) -> dict[str, Any]:
    """:func:`score_model`'s keyword arguments under ``recipe``: the reply budget, each pass's batch
    (:func:`resolve_eval_batches`), the seed and the autocast training ran under."""
    batches = resolve_eval_batches(recipe, model, examples, max_new_tokens, batch_size, say)
    return {
        "max_new_tokens": max_new_tokens,
        "batch_size": batches.scoring,
        "generation_batch_size": batches.generation,
        "seed": recipe.seed,
        "bf16": recipe.bf16,
    }


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Scores:
    """One model's figures on the examples, and the replies they were computed from."""

    response_loss: float
    perplexity: float
    stop_rate: float
    mean_length: float
    exact_match: float
    rouge_l: float
    num_examples: int
    supervised_tokens: int
    replies: list[str] = field(default_factory=list, repr=False)
    reply_ids: list[list[int]] = field(default_factory=list, repr=False)  # generated tokens, end-of-turn excluded
    stopped: list[bool] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, Any]:
        """The figures as JSON numbers (None where not finite)."""
        return {name: _finite(getattr(self, name)) for name in METRICS}

    def same_as(self, other: Scores) -> bool:
        """Bit-identical loss and replies: the difference between two models did not reach their outputs."""
        return (
            self.response_loss == other.response_loss
            and self.reply_ids == other.reply_ids
            and self.stopped == other.stopped
        )


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class Example:
    """One held-out conversation as training saw it, and its generation prompt and reference reply."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str


def prepare_examples(dataset: Any, tokenizer: Any) -> list[Example]:
    """Examples from a dataset built by :func:`~hf_lora_recipe.data.pipeline.build_sft_dataset` (``messages``,
    ``input_ids``, ``labels``): the prompt is the conversation up to its last user turn, the reference its last
    assistant turn."""
    from hf_lora_recipe.templates.llama2 import encode_prompt, special_ids

    ids = special_ids(tokenizer)
    examples = []
    for messages, input_ids, labels in zip(dataset["messages"], dataset["input_ids"], dataset["labels"]):
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        examples.append(
            Example(
                list(input_ids),
                list(labels),
                encode_prompt(tokenizer, messages[:last], ids),
                messages[last]["content"].strip(),
            )
        )
    return examples


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _progress(items: list, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, disable=not enabled or len(items) < 2, file=sys.stderr)


def response_loss(
    model: Any, examples: list[Example], pad_id: int, batch_size: int, label: str = "", progress: bool = True
) -> tuple[float, int]:
    """(token-weighted mean cross-entropy over the supervised tokens, their count): the training loss, summed
    over every supervised token rather than averaged per batch, so batching does not change it."""
    import torch
    import torch.nn.functional as F

    from hf_lora_recipe.templates.llama2 import IGNORE_INDEX

    device = model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    total, tokens = 0.0, 0
    for batch in _progress(_batches(order, batch_size), f"{label} loss".strip(), progress):
        width = max(len(examples[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding: positions count from 0 as in training
            length = len(examples[i].input_ids)
            input_ids[row, :length] = torch.tensor(examples[i].input_ids)
            labels[row, :length] = torch.tensor(examples[i].labels)
            mask[row, :length] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        supervised = targets != IGNORE_INDEX
        total += F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="sum").item()
        tokens += int(supervised.sum())
    return total / max(tokens, 1), tokens


def reference_lengths(examples: list[Example]) -> list[int]:
    """Each reference reply's length in tokens, its end-of-turn token included: the last supervised span."""
    from hf_lora_recipe.data.label_audit import supervised_spans

    lengths = []
    for example in examples:
        spans = supervised_spans(example.labels)
        lengths.append(spans[-1][1] - spans[-1][0] if spans else 0)
    return lengths


def reply_budget(examples: list[Example], cap: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """``max_new_tokens`` sized from the held-out references: their 95th-percentile length plus a quarter, at most
    ``cap``. Generating far past what any reference needs only measures how long a reply that never stops runs."""
    lengths = sorted(reference_lengths(examples))
    if not lengths:
        return cap
    quantile = lengths[min(len(lengths) - 1, math.ceil(REPLY_BUDGET_QUANTILE * len(lengths)) - 1)]
    return max(1, min(cap, math.ceil(quantile * REPLY_BUDGET_MARGIN)))


def recipe_reply_budget(examples: list[Example], recipe: Recipe) -> int:
    """:func:`reply_budget` within the recipe's ``max_length``: a longer reply was never trained."""
    return reply_budget(examples, cap=min(DEFAULT_MAX_NEW_TOKENS, recipe.max_length))


def greedy_replies(
    model: Any,
    examples: list[Example],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    batch_size: int,
    label: str = "",
    progress: bool = True,
) -> tuple[list[list[int]], list[bool]]:
    """(each reply's tokens up to its end-of-turn token, whether it reached one) - batched, left-padded."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True
    )  # training configs turn the cache off
    device = model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    replies: list[list[int]] = [[] for _ in examples]
    stopped = [False] * len(examples)
    for batch in _progress(_batches(order, batch_size), f"{label} generation".strip(), progress):
        width = max(len(examples[i].prompt_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            prompt = examples[i].prompt_ids
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for row, i in enumerate(batch):
            generated = output[row, width:].tolist()
            stopped[i] = eos_id in generated
            replies[i] = generated[: generated.index(eos_id)] if stopped[i] else generated
    return replies, stopped


def score_model(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    generation_batch_size: int | None = None,
    seed: int = 42,
    bf16: bool = False,
    label: str = "",
    progress: bool = True,
    loss_sums: list[tuple[float, int]] | None = None,
) -> Scores:
    """Every figure for one loaded model (a PeftModel scores with its adapter as it is: on, or off inside
    ``with model.disable_adapter():``). Eval mode and no gradients; the model's mode is restored after.
    ``batch_size`` examples per scoring forward, ``generation_batch_size`` (default the same) per generate call.
    ``loss_sums``: each example's summed response loss and token count, already computed for this model (the
    trainer's final evaluation): the loss is read from them instead of a scoring pass."""
    import torch
    from rouge_score import rouge_scorer
    from transformers import set_seed

    from hf_lora_recipe.templates.llama2 import special_ids

    eos_id = special_ids(tokenizer).eos_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    device_type = model.device.type
    was_training = model.training
    model.eval()
    set_seed(seed)
    try:
        # the autocast training ran under (bf16), so the loss is the one the trainer would report
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            if loss_sums is None:
                loss, tokens = response_loss(model, examples, pad_id, batch_size, label, progress)
            else:
                tokens = sum(count for _, count in loss_sums)
                loss = sum(total for total, _ in loss_sums) / max(tokens, 1)
            reply_ids, stopped = greedy_replies(
                model, examples, eos_id, pad_id, max_new_tokens, generation_batch_size or batch_size, label, progress
            )
    finally:
        model.train(was_training)
    replies = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in reply_ids]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    count = max(len(examples), 1)
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return Scores(
        response_loss=loss,
        perplexity=perplexity,
        stop_rate=sum(stopped) / count,
        mean_length=sum(len(ids) for ids in reply_ids) / count,
        exact_match=sum(reply == example.reference for reply, example in zip(replies, examples)) / count,
        rouge_l=sum(
            scorer.score(example.reference, reply)["rougeL"].fmeasure for reply, example in zip(replies, examples)
        )
        / count,
        num_examples=len(examples),
        supervised_tokens=tokens,
        replies=replies,
        reply_ids=reply_ids,
        stopped=stopped,
    )


def score_base_and_adapter(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    adapter_loss_sums: list[tuple[float, int]] | None = None,
    **options: Any,
) -> dict[str, Scores]:
    """{"base": ..., "adapter": ...} for a loaded PeftModel: the base is the same model with the adapter off.
    ``adapter_loss_sums``: the adapter's per-example losses from the trainer's final evaluation (see
    :func:`fold_adapter_losses`), used in place of its scoring pass."""
    with model.disable_adapter():
        base = score_model(model, tokenizer, examples, label="base", **options)
    adapter = score_model(model, tokenizer, examples, label="adapter", loss_sums=adapter_loss_sums, **options)
    return {"base": base, "adapter": adapter}


def fold_adapter_losses(
    examples: list[Example], loss_sums: list[tuple[float, int]] | None
) -> list[tuple[float, int]] | None:
    """The trainer's per-example losses for ``examples`` (its held-out set's first rows, in order), or None where
    they cannot stand for a scoring pass: not kept, too few, or a token count differing from what the example
    supervises (different rows or tokens)."""
    from hf_lora_recipe.templates.llama2 import IGNORE_INDEX

    if loss_sums is None or len(loss_sums) < len(examples):
        return None
    supervised = [sum(label != IGNORE_INDEX for label in example.labels[1:]) for example in examples]
    if [count for _, count in loss_sums[: len(examples)]] != supervised:
        return None
    return loss_sums[: len(examples)]


def check_effect(scores: dict[str, Scores]) -> None:
    """An adapter (or merged model) that computes exactly what the base does was ignored or never trained."""
    for name, figures in scores.items():
        if name != "base" and figures.same_as(scores["base"]):
            raise RecipeError(
                f"the adapter had no effect: the {'merged model' if name == 'merged' else name} gives exactly the "
                "base's response loss "
                f"({figures.response_loss:.6f}) and the same {figures.num_examples} greedy replies; its LoRA B "
                "matrices may be all zero (untrained) or its target modules not in this base"
            )


# ---------------------------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """Where the evaluation examples come from, as the report names it."""

    recipe: Recipe  # the run's recipe, pointed at the data to evaluate on
    split: str | None  # the split to read; None: the run's own held-out set
    description: str  # the split, e.g. "test", or "train, 4 rows held out by eval_split_size (seed 42)"


def held_out_description(recipe: Recipe) -> str:
    """The run's held-out set as the report names it: its split, or the rows ``eval_split_size`` set apart."""
    if recipe.dataset_test_split:
        return recipe.dataset_test_split
    size = recipe.eval_split_size
    share = f"{int(size)} rows" if size >= 1 else f"{size:.0%} of the rows"
    return f"{recipe.dataset_train_split}, {share} held out by eval_split_size, seed {recipe.seed}"


def _default_split(recipe: Recipe, flag: str) -> str:
    """test, else validation, else the train split of a local dataset; test for a Hub dataset."""
    from hf_lora_recipe.data.readers import local_path, local_splits

    try:
        path = local_path(recipe)
    except RecipeError as error:  # a path that is not there
        raise RecipeError(f"{flag} {str(error).removeprefix('dataset_name ')}") from None
    if path is None:
        return "test"
    splits = local_splits(path)
    return next((name for name in ("test", "validation") if name in splits), recipe.dataset_train_split)


def choose_data(recipe: Recipe, source: str, dataset: str | None, split: str | None) -> EvalData:
    """What to evaluate on (module docstring), checked without reading any row."""
    from hf_lora_recipe.data.readers import split_files

    if dataset is not None:
        path = Path(dataset).expanduser()
        recipe = dataclasses.replace(
            recipe,
            dataset_name=str(path) if path.exists() else dataset,
            dataset_config=None,
            dataset_revision=None,
            dataset_format="auto",
            dataset_test_split=None,
            eval_split_size=0.0,
        )
        split = split or _default_split(recipe, "--dataset")
    if split is not None:
        try:
            split_files(recipe, split)
        except RecipeError as error:  # name the flag the user typed, not the recipe key
            raise RecipeError(str(error).replace("dataset_test_split:", "--split:", 1)) from None
        return EvalData(recipe, split, split)
    if not recipe.dataset_test_split and not recipe.eval_split_size:
        raise RecipeError(
            f"the run in {source} had no held-out set (neither dataset_test_split nor eval_split_size "
            "in its recipe.yaml): pass --dataset PATH_OR_ID (and --split NAME) to say what to "
            "evaluate on"
        )
    if recipe.dataset_test_split:
        split_files(recipe, recipe.dataset_test_split)  # still where the run read it
        return EvalData(recipe, recipe.dataset_test_split, recipe.dataset_test_split)
    split_files(recipe)  # the training rows the held-out ones are split from are still where the run read them
    return EvalData(recipe, None, held_out_description(recipe))


def data_version(data: EvalData) -> dict[str, str]:
    """The data to score as the run records it: ``name`` as the report, the card and model-index name it (a file
    by its name, a Hub id, a mixture's sources joined with " + "; never a local path, never a default the run
    did not use) and ``version`` (its files' sha256, or the Hub revision)."""
    from hf_lora_recipe.data.mixture import dataset_versions

    return dataset_versions(data.recipe)


def check_held_out_unchanged(data: EvalData, source: Path, now: dict[str, str]) -> None:
    """Rows ``eval_split_size`` held out are split off again from the run's data: only the same data gives the
    same rows, so a changed file is refused (the run recorded its data's digest in training_results.json;
    ``now``: :func:`data_version`)."""
    from hf_lora_recipe.shipping.model_card import RESULTS_FILE

    if data.split is not None or not (source / RESULTS_FILE).is_file():
        return
    try:
        recorded = json.loads((source / RESULTS_FILE).read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(recorded, dict) and recorded.get("version") != now["version"]:
        raise RecipeError(
            f"{now['name']} changed since training ({recorded.get('version')} then, {now['version']} now), so the "
            "rows eval_split_size held out cannot be found again; pass --dataset and --split to score other data"
        )


def count_trained(scored: Any, source: Path, allow: bool, say: Any, held_out: bool = False) -> int | None:
    """How many of the examples to score the run trained on, refused unless ``allow`` (then the report and the
    card say so); None when the run recorded no example identities (said, not refused). ``held_out``: the run's
    own held-out set, where a match is a row the data holds twice: said and counted, not refused."""
    from hf_lora_recipe.data.pipeline import TRAINING_EXAMPLES, trained_examples

    trained = trained_examples(scored, source)
    if trained is None:
        say(f"eval: {source} holds no {TRAINING_EXAMPLES}, so whether training saw these examples is not checked")
    elif trained and held_out:
        say(
            f"eval: {trained} of the {len(scored)} held-out examples also occur among the training examples (rows "
            "the data holds twice): the report counts them as trained on"
        )
    elif trained and not allow:
        raise RecipeError(
            f"{trained} of the {len(scored)} examples to score were trained on (their token ids match the run's "
            "training examples): score held-out data, or pass --allow_training_rows to score them as training rows"
        )
    return trained


def load_examples(data: EvalData, tokenizer: Any) -> Any:
    """The examples as training built them; rows held out by ``eval_split_size`` are split off again by
    ``train_and_eval`` itself (same rows, same seed)."""
    from hf_lora_recipe.data.pipeline import build_sft_dataset, train_and_eval
    from hf_lora_recipe.data.readers import load_rows

    if data.split is not None:
        dataset, _ = build_sft_dataset(data.recipe, tokenizer, load_rows(data.recipe, split=data.split))
        return dataset
    _, held_out, _ = train_and_eval(data.recipe, tokenizer)
    return held_out


def examples_for(recipe: Recipe, tokenizer: Any, data: Any, num_examples: int | None = None) -> list[Example]:
    """The first ``num_examples`` (default: all) of ``data`` (see :func:`as_dataset`), ready to score."""
    built = as_dataset(recipe, tokenizer, data)
    count = len(built) if num_examples is None else min(num_examples, len(built))
    return prepare_examples(built.select(range(count)), tokenizer)


def as_dataset(recipe: Recipe, tokenizer: Any, data: Any) -> Any:
    """A dataset of ``messages``/``input_ids``/``labels`` from a built dataset (returned as it is), ``Rows``, or a
    list of raw rows in the recipe's format (or of ``{"messages": [...]}`` conversations)."""
    from hf_lora_recipe.data.pipeline import build_sft_dataset
    from hf_lora_recipe.data.readers import Rows

    if hasattr(data, "column_names") and "input_ids" in data.column_names:
        return data
    if isinstance(data, list):
        from datasets import Dataset

        if data and set(data[0]) == {"messages"}:
            recipe = dataclasses.replace(recipe, dataset_format="messages")
        data = Rows(Dataset.from_list(data), ["rows"], [0], ["rows"], [None])
    if not isinstance(data, Rows):
        raise TypeError(f"cannot evaluate on {type(data).__name__}: give a built dataset, Rows or a list of rows")
    dataset, _ = build_sft_dataset(recipe, tokenizer, data)
    return dataset


# ---------------------------------------------------------------------------------------------- models


def _on_accelerator(model: Any) -> Any:
    import torch

    if torch.cuda.is_available() and model.device.type == "cpu" and not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model


def load_base(recipe: Recipe) -> Any:
    """The base as training loaded it (quantization, dtype, the optional fp32 upcast), frozen, in eval mode."""
    from hf_lora_recipe.model.loading import load_base_model, prepare_base

    base = prepare_base(load_base_model(recipe), dataclasses.replace(recipe, gradient_checkpointing=False))
    return _on_accelerator(base).eval()


def load_adapter(recipe: Recipe, adapter_dir: str | Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(recipe), str(adapter_dir)).eval()


def load_merged(model_dir: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    return _on_accelerator(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")).eval()


def load_eval_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved with the adapter or merged model: the one training used, with its chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:  # trained elsewhere; padding positions are masked or cut off anyway
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------- report


def build_report(scores: dict[str, Scores], dataset: str, split: str, max_new_tokens: int) -> dict[str, Any]:
    first = next(iter(scores.values()))
    return {
        "dataset": dataset,
        "split": split,
        "num_examples": first.num_examples,
        "max_new_tokens": max_new_tokens,
        "models": {name: figures.metrics() for name, figures in scores.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned table under a headline: one row per metric, one column per model."""
    from hf_lora_recipe.shipping.model_card import evaluation_rows

    header, rows = evaluation_rows(report)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    trained = f"; {report['trained_on']} of them TRAINING rows, not held out" if report.get("trained_on") else ""
    headline = (
        f"{' vs '.join(report['models'])} on {report['num_examples']} examples of {report['dataset']} "
        f"({report['split']}{trained}); greedy, at most {report['max_new_tokens']} new tokens"
    )
    return "\n".join([headline, *lines])


def record_in_card(directory: Path, report: dict[str, Any], say: Any = log.info) -> None:
    """The ``## Evaluation`` section of the card in ``directory`` (:func:`~hf_lora_recipe.shipping.model_card.write_evaluation`)."""
    from hf_lora_recipe.shipping.model_card import write_evaluation

    skipped = write_evaluation(directory, report)
    if skipped:
        log.warn(f"evaluation not written into the model card: {skipped}")
    else:
        say(f"evaluation written into {directory / 'README.md'}")


def evaluate_adapter(
    recipe: Recipe,
    adapter_dir: str | Path,
    data: Any,
    *,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    max_new_tokens: int | None = None,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    model: Any = None,
    tokenizer: Any = None,
    merged_dir: str | Path | None = None,
    dataset: str | None = None,
    split: str | None = None,
    write_card: bool = True,
    progress: bool = True,
    say: Any = log.info,
    adapter_loss_sums: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Base vs adapter (vs merged model) on the first ``num_examples`` of ``data``; returns the report (the
    ``--json`` object) and records it in the adapter's card unless ``write_card`` is false. ``batch_size``: a
    number, or ``auto`` (:func:`resolve_eval_batches`).

    ``data``: a dataset built by ``build_sft_dataset`` (the trainer's eval set), ``Rows``, or a list of raw
    rows. ``model``: the PeftModel already in memory (``train`` passes the one it trained), else the saved
    adapter is loaded onto the base as training loaded it. ``tokenizer``: default, the adapter's.
    ``dataset``/``split`` name the data in the report (default: the recipe's dataset, its held-out set).
    ``adapter_loss_sums``: ``model``'s per-example losses on ``data`` from the trainer's final evaluation; the
    adapter's loss is read from them when they fit the examples (:func:`fold_adapter_losses`).
    Raises :class:`RecipeError` when the adapter had no effect.
    """
    adapter_dir = Path(adapter_dir)
    tokenizer = tokenizer if tokenizer is not None else load_eval_tokenizer(adapter_dir)
    examples = examples_for(recipe, tokenizer, data, num_examples)
    if not examples:
        raise RecipeError("no examples to evaluate on")
    max_new_tokens = max_new_tokens or recipe_reply_budget(examples, recipe)
    model = model if model is not None else load_adapter(recipe, adapter_dir)
    options = scoring_options(recipe, model, examples, max_new_tokens, batch_size, say)
    options["progress"] = progress
    folded = fold_adapter_losses(examples, adapter_loss_sums)
    scores = score_base_and_adapter(model, tokenizer, examples, folded, **options)
    if merged_dir is not None:
        scores["merged"] = score_model(load_merged(merged_dir), tokenizer, examples, label="merged", **options)
    check_effect(scores)
    from hf_lora_recipe.data.mixture import dataset_versions

    label = dataset or dataset_versions(recipe)["name"]  # a mixture by its sources, never the default name
    report = build_report(scores, label, split or held_out_description(recipe), max_new_tokens)
    if write_card:
        record_in_card(adapter_dir, report)
    return report


def evaluate_merged(
    recipe: Recipe,
    model_dir: str | Path,
    data: Any,
    tokenizer: Any,
    *,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    max_new_tokens: int | None = None,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    dataset: str,
    split: str,
    say: Any = log.info,
) -> dict[str, Any]:
    """Base vs a merged model (no adapter folder) on the first ``num_examples`` of ``data``; returns the report.
    Raises :class:`RecipeError` when the merged model scores exactly as its base."""
    examples = examples_for(recipe, tokenizer, data, num_examples)
    max_new_tokens = max_new_tokens or recipe_reply_budget(examples, recipe)
    base = load_base(recipe)
    options = scoring_options(recipe, base, examples, max_new_tokens, batch_size, say)
    scores = {"base": score_model(base, tokenizer, examples, label="base", **options)}
    del base
    scores["merged"] = score_model(load_merged(model_dir), tokenizer, examples, label="merged", **options)
    check_effect(scores)
    return build_report(scores, dataset, split, max_new_tokens)


def evaluate_after_training(
    recipe: Recipe,
    output_dir: Path,
    eval_dataset: Any,
    model: Any,
    tokenizer: Any,
    adapter_loss_sums: list[tuple[float, int]] | None = None,
) -> None:
    """``train``'s last step: the saved adapter against its base on ``final_eval_examples`` held-out examples,
    printed and written into the card. The main process only; the others are done. The trained model is
    scored in place (its base with the adapter switched off), its loss read from the trainer's final evaluation
    (``adapter_loss_sums``) rather than scored again; FSDP and ZeRO-3 shard it across the processes, so there
    the main process loads the saved adapter instead and scores it."""
    if eval_dataset is None or recipe.final_eval_examples <= 0 or not log.is_main_process():
        return
    from hf_lora_recipe.distributed.engines import current_engine

    count = min(recipe.final_eval_examples, len(eval_dataset))
    import torch

    log.info(f"evaluating base vs adapter on {count} held-out examples (final_eval_examples; 0 skips this)")
    in_place = model is not None and not current_engine().shards_weights
    try:
        report = evaluate_adapter(
            recipe,
            output_dir,
            eval_dataset,
            num_examples=count,  # and max_new_tokens sized from these references
            model=model if in_place else None,
            tokenizer=tokenizer,
            write_card=False,
            adapter_loss_sums=adapter_loss_sums if in_place else None,
        )
    except torch.OutOfMemoryError:  # the adapter is saved: say how to evaluate it, don't fail the run
        log.warn(
            f"the final evaluation ran out of memory; run it alone: hf-lora-recipe eval --adapter {output_dir} "
            f"--num_examples {count} --batch_size 1"
        )
        return
    from hf_lora_recipe.data.pipeline import trained_examples

    trained = trained_examples(eval_dataset.select(range(count)), output_dir)
    if trained:  # rows the data holds twice: one copy trained on, the other held out
        log.info(
            f"{trained} of the {count} held-out examples also occur among the training examples (rows the data holds twice)"
        )
        report["trained_on"] = trained
    for line in format_table(report).splitlines():
        log.info(line)
    record_in_card(output_dir, report)


# ---------------------------------------------------------------------------------------------- command


def check_adapter_dir(adapter: str) -> Path:
    path = Path(adapter).expanduser()
    if not path.exists():
        raise RecipeError(f"--adapter {adapter}: no such folder; give the adapter's folder (a training output_dir)")
    if not path.is_dir():
        raise RecipeError(f"--adapter {adapter} is a file: give the adapter's folder (a training output_dir)")
    if not (path / "adapter_config.json").is_file():
        raise RecipeError(
            f"--adapter {adapter}: no adapter_config.json there, so not an adapter (is it a training output_dir?)"
        )
    return path.resolve()


# eval scores on the base the run names (it has no --base): what a user can do when that base is gone
EVAL_BASE_FIX = "put the base back there, or set model_name_or_path in recipe.yaml to where it is now"


def check_same_run(adapter_dir: Path, model_dir: Path) -> None:
    """``--model`` is a merge of ``--adapter``'s base with the same tokenizer: checked before any weight loads."""
    from transformers import AutoTokenizer

    from hf_lora_recipe.shipping.merging import check_fits

    recipe = saved_recipe(adapter_dir)
    check_fits(adapter_dir, str(model_dir), "--model", bool(recipe and recipe.trust_remote_code))
    if (
        AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()
        != AutoTokenizer.from_pretrained(str(adapter_dir)).get_vocab()
    ):
        raise RecipeError(
            f"--model {model_dir} has another tokenizer than --adapter {adapter_dir}: it is not a merge of this "
            "adapter; give the folder hf-lora-recipe merge wrote from it"
        )


def check_model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise RecipeError(
            f"--model {model}: no such folder; give a merged model's folder (hf-lora-recipe merge --output)"
        )
    if not (path / "config.json").is_file():
        raise RecipeError(f"--model {model}: no config.json there, so not a model (a merged model's folder has one)")
    return path.resolve()


def run_recipe(source: Path, adapter_dir: Path | None, dataset: str | None) -> Recipe:
    """The recipe the run saved; for an adapter trained elsewhere, the seed's settings on its base (``--dataset``
    required: there is no record of a held-out set)."""
    from hf_lora_recipe.shipping.merging import base_of, check_base

    recipe = saved_recipe(source)
    if recipe is not None:
        check_base(recipe.model_name_or_path, f"{source / 'recipe.yaml'}", EVAL_BASE_FIX)
        return recipe
    if adapter_dir is None:
        raise RecipeError(
            f"{source} has no recipe.yaml, so its base model is unknown: give the adapter it was "
            "merged from with --adapter"
        )
    if dataset is None:
        raise RecipeError(
            f"{source} has no recipe.yaml (not trained by hf-lora-recipe?), so its held-out set is "
            "unknown: pass --dataset PATH_OR_ID"
        )
    base = check_base(base_of(adapter_dir), f"{adapter_dir / 'adapter_config.json'}", EVAL_BASE_FIX)
    assumed = Recipe(model_name_or_path=base, load_in_4bit=False, dataset_name=dataset, dataset_format="auto")
    log.info(
        f"{source} has no recipe.yaml: assuming the seed's layout (chat_template {assumed.chat_template}, max_length "
        f"{assumed.max_length}, loss on responses only) on {base} loaded unquantized, and the tokenizer saved there"
    )
    return assumed
