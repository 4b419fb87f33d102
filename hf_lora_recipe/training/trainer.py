"""TRL's SFTTrainer, configured from the recipe, with the two things this recipe adds: a loss path per
backend, and a record of what each rank read.

``lm_head_loss``: TRL computes the loss with its fused, tiled LM-head kernel, which never materialises the
(batch x length x vocab) logits - the right trade on a GPU, where the 128k-vocabulary logits of Llama 3 cost
~3 GB. On a CPU that kernel is most of the step (fp32 tiles forward and backward) and memory is not the
constraint, so ``auto`` uses the model's own cross-entropy there. Both normalise by the supervised tokens of
the whole accumulated, all-process batch (``num_items_in_batch``), so the choice changes speed, not numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_lora_recipe import log
from hf_lora_recipe.model.loading import attention_for, attention_in_use, liger_active, padding_free
from hf_lora_recipe.recipe.schema import Recipe, RecipeError
from hf_lora_recipe.upstream.transformers import AfterCheckpoint
from hf_lora_recipe.upstream.trl import set_train_metric


# Recipe keys that are SFTConfig fields with the same name and meaning: passed through unchanged.
SFT_CONFIG_KEYS = (
    "output_dir",
    "per_device_train_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "seed",
    "train_sampling_strategy",
)

# transformers 5.24 renamed TrainingArguments' gradient_checkpointing* to activation_checkpointing* (the old
# names warn); older 5.x releases know only the old ones.
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
    else "gradient_checkpointing"
)


def uses_fused_loss(lm_head_loss: str) -> bool:
    return lm_head_loss == "fused" or (lm_head_loss == "auto" and torch.cuda.is_available())


@functools.cache
def offloading_active(requested: bool) -> bool:
    """Activation offloading moves saved activations from the GPU to CPU memory; without a GPU they are there."""
    return requested and torch.cuda.is_available()


def speed_line(recipe: Recipe) -> str:
    """What the run chose for speed, logged once at the start: each opt-in option on, or off and why."""
    from hf_lora_recipe.model.loading import liger_off_reason

    def state(asked: bool, active: bool, reason: str | None) -> str:
        return "on" if active else f"off ({reason})" if asked else "off"

    peak = peak_flops()
    return (
        f"loss: {'TRL fused LM head (no full logits)' if uses_fused_loss(recipe.lm_head_loss) else 'model cross-entropy'}; "
        f"attention: {attention_for(recipe)}; padding-free: {padding_free(recipe)}; "
        f"liger-kernel: {state(recipe.use_liger_kernel, liger_active(recipe.use_liger_kernel), liger_off_reason())}; "
        f"activation offloading: {state(recipe.activation_offloading, offloading_active(recipe.activation_offloading), 'no GPU: activations already live in RAM')}; "
        f"compile: {'on (proved after step 1)' if recipe.compile else 'off'}; "
        f"bf16: {bf16_state(recipe)}; "
        f"MFU against: {peak[1] if peak else 'n/a (no known GPU peak)'}"
    )


# CPU feature flags (/proc/cpuinfo) under which bf16 matmuls run in hardware: x86's AVX512-BF16 and AMX, Arm's BF16
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 matmuls in hardware; None where its flags cannot be read (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as source:
                cpuinfo = source.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool(NATIVE_BF16_FLAGS & set(value.split()))
    return None


def bf16_state(recipe: Recipe) -> str:
    """bf16 as this run computes it. Without hardware bf16, torch emulates its matmuls on the CPU, many times
    slower than fp32 (docs/speed.md): said at the start, since the numbers differ and the recipe decides."""
    asked = recipe.bf16 or (recipe.load_in_4bit and recipe.bnb_4bit_compute_dtype == "bfloat16")
    if not asked:
        return "off"
    if torch.cuda.is_available() or cpu_has_native_bf16() is not False:
        return "on"
    return (
        "on, emulated: this CPU has no AVX512-BF16 or AMX, so bf16 trains far slower than fp32 here "
        "(bf16: false and bnb_4bit_compute_dtype: float32 train in fp32)"
    )


def check_report_to(recipe: Recipe) -> None:
    """Every tracker in ``report_to`` is one transformers knows and is installed: checked before the model loads."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if recipe.report_to in (["none"], ["all"]):
        return
    installed = set(get_available_reporting_integrations())
    for name in recipe.report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(
                f"report_to: unknown tracker {name!r}; transformers supports "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or all / none)"
            )
        if name not in installed:
            raise RecipeError(f"report_to: {name} is not installed here; pip install {name} (or report_to none)")


def _known_name(key: str, value: str, known: list[str]) -> None:
    if value not in known:
        import difflib

        close = [name for name in known if name.startswith(value)] or difflib.get_close_matches(value, known, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        shown = ", ".join(known[:12]) + (f" and {len(known) - 12} more" if len(known) > 12 else "")
        raise RecipeError(f"{key}: {value!r} is not a name transformers knows; {guess}(one of {shown})")


def check_names(recipe: Recipe) -> None:
    """``lr_scheduler_type`` and ``optim`` are names transformers knows: checked before the model loads (the
    trainer would only refuse them once everything is loaded)."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    _known_name("lr_scheduler_type", recipe.lr_scheduler_type, [s.value for s in SchedulerType])
    _known_name("optim", recipe.optim, [o.value for o in OptimizerNames])
    check_report_to(recipe)


def trainer_config(recipe: Recipe, accumulation: int, has_eval: bool = False) -> SFTConfig:
    return SFTConfig(
        **{key: getattr(recipe, key) for key in SFT_CONFIG_KEYS},
        gradient_accumulation_steps=accumulation,  # derived from global_batch_size and the world size
        **{
            CHECKPOINTING: recipe.gradient_checkpointing,
            f"{CHECKPOINTING}_kwargs": {"use_reentrant": False},
        },  # reentrant checkpointing breaks LoRA under DDP
        max_length=None,  # our data step already truncated to recipe.max_length
        eval_strategy="steps" if has_eval else "no",
        per_device_eval_batch_size=recipe.per_device_train_batch_size,
        use_cpu=not torch.cuda.is_available(),
        # Our dataset already holds input_ids and labels, masked and truncated exactly as `preview` shows.
        dataset_kwargs={"skip_prepare_dataset": True},
        ddp_find_unused_parameters=False,
        # Examples concatenated into one row with restarting position_ids: no padding is computed, and the
        # attention mask built from the position ids keeps examples from seeing each other.
        padding_free=padding_free(recipe),
        use_liger_kernel=liger_active(recipe.use_liger_kernel),
        activation_offloading=offloading_active(recipe.activation_offloading),
    )


# The running counts on the device, one tensor so the step never copies to the host: read at logging time.
COUNTS = ("tokens", "supervised", "examples", "digest", "correct", "scored")
COUNTS_FILE = "data_counts_rank{rank}.json"  # in each checkpoint: the counts so far, so a resume continues them
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic): integer products wrap modulo 2**64
# identically on every device, so the digest of a token sequence does not depend on where or how it was batched.
_MIX_1, _MIX_2 = 0x9E3779B97F4A7C15 - 2**64, 0xBF58476D1CE4E5B9 - 2**64


def token_digest(input_ids: torch.Tensor, real: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """An order-sensitive checksum of the real tokens, continuing a sequence ``offset`` tokens long: each token
    weighted by a hash of its position in the whole stream (no device->host copy)."""
    position = offset + torch.cumsum(real.reshape(-1).long(), 0)
    weight = position * _MIX_1
    weight = (weight ^ (weight >> 31)) * _MIX_2
    return ((input_ids.reshape(-1).long() + 1) * weight * real.reshape(-1)).sum()


def _score_every_position() -> None:
    """TRL's fused LM head scores only the supervised positions on GPUs (``hidden[mask]``): a boolean index whose
    size the host must read, so the GPU drains every micro-batch. Scoring every position keeps the shapes known
    in advance; ignored positions are zeroed before the loss either way, so the loss is the same, for ~15% more
    LM-head work on Alpaca (its prompt tokens) instead of a stall. TRL reads this switch from its module at call
    time; its Triton kernels (chosen in trl.kernels) are untouched."""
    from hf_lora_recipe.upstream.trl import score_every_position

    score_every_position()


def example_loss_sums(
    outputs: Any, labels: torch.Tensor, position_ids: torch.Tensor | None
) -> list[tuple[float, int]]:
    """Each example's next-token loss summed over its supervised tokens, and their count, in the order the batch
    holds the examples: one per row, or, in a padding-free row, one per run of positions counting from 0. The
    per-token losses are TRL's fused LM head's (``log_probs``) or the cross-entropy of the model's logits."""
    targets = labels[:, 1:]
    scored = targets != -100
    if getattr(outputs, "log_probs", None) is not None:
        losses = -outputs.log_probs
    else:
        logits = outputs.logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
        ).view_as(targets)
    if position_ids is not None and labels.shape[0] == 1:  # a packed row: a target belongs to the token it names
        starts = position_ids[0] == 0
        example = (torch.cumsum(starts, 0) - 1)[1:].clamp(min=0).unsqueeze(0)
        count = int(starts.sum())
    else:
        example = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)
        count = labels.shape[0]
    sums = torch.zeros(count, dtype=torch.float64, device=labels.device)
    tokens = torch.zeros(count, dtype=torch.int64, device=labels.device)
    sums.index_add_(0, example.flatten(), (losses.double() * scored).flatten())
    tokens.index_add_(0, example.flatten(), scored.flatten().long())
    return list(zip(sums.tolist(), tokens.tolist()))


class RecipeTrainer(AfterCheckpoint, SFTTrainer):
    """SFTTrainer that keeps the step free of device->host copies (the GPU never waits on Python mid-step):
    what each rank read, TRL's token accuracy and entropy, and throughput are summed on the device and read
    when the trainer logs."""

    def __init__(
        self,
        *args: Any,
        fused_loss: bool = True,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        loraplus_lr_ratio: float | None = None,
        **kwargs: Any,
    ):
        model = kwargs["model"] if "model" in kwargs else args[0]
        adapter_dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        # SFTTrainer casts a quantized model's adapter to bf16 whatever its compute dtype; the adapter keeps the
        # dtype the recipe gave it (finish_adapter), so an fp32-compute QLoRA run has no bf16 matmul in it.
        for name, param in self.model.named_parameters():
            if name in adapter_dtypes and param.dtype != adapter_dtypes[name]:
                param.data = param.data.to(adapter_dtypes[name])
        if not torch.cuda.is_available():
            from hf_lora_recipe.training.lora_dropout import use_skipping_dropout

            use_skipping_dropout(self.model)
        self.fused_loss = fused_loss
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.positions = 0  # padded positions processed: known from shapes on the host
        self._counts = torch.zeros(len(COUNTS), dtype=torch.int64, device=self.args.device)
        self._entropy = torch.zeros((), dtype=torch.float64, device=self.args.device)
        if fused_loss:
            _score_every_position()
        self._last_log: tuple[float, int] | None = None
        self.example_losses: list[tuple[float, int]] | None = None  # filled by final_evaluate
        self._keep = 0  # how many held-out examples final_evaluate keeps the losses of

    def final_evaluate(self, keep: int) -> None:
        """The trainer's evaluate pass over the held-out set, logged like every other, keeping the first ``keep``
        examples' summed losses and token counts (:func:`example_loss_sums`), so the end-of-training evaluation
        of those examples reads the adapter's loss from it instead of scoring the adapter a second time. Kept on
        one process only: several split the held-out set between them."""
        self.example_losses = [] if self.accelerator.num_processes == 1 and keep > 0 else None
        self._keep = keep if self.example_losses is not None else 0
        try:
            self.evaluate()
        finally:
            self._keep = 0

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """LoRA+ (``loraplus_lr_ratio``): PEFT's ``create_loraplus_optimizer`` builds AdamW with the B matrices at
        learning_rate x ratio, then :func:`check_loraplus` proves the groups say so; otherwise Trainer's own."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        args, model = self.args, self.model if model is None else model
        self.optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            fused=args.optim == "adamw_torch_fused",
        )
        check_loraplus(self.optimizer, model, args.learning_rate, self.loraplus_lr_ratio)
        log.info(
            f"LoRA+: lora_B at learning_rate x {self.loraplus_lr_ratio:g} = "
            f"{args.learning_rate * self.loraplus_lr_ratio:g}, lora_A at {args.learning_rate:g} (checked per tensor)"
        )
        return self.optimizer

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """TRL writes a draft README.md into output_dir at every checkpoint; ours is written once, at the end,
        and a README.md we did not write is never touched."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training or len(self.example_losses or ()) >= self._keep:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        # the outputs of the forward the loss came from (asking the loss for them costs TRL's fused head a second
        # forward, which rebuilds the logits)
        outputs: list[Any] = []
        hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            result = self._loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        with torch.no_grad():
            self.example_losses += example_loss_sums(outputs[0], inputs["labels"], inputs.get("position_ids"))
        return result

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        if not self.fused_loss:
            # Packed rows are kept apart by a mask derived from position_ids, which transformers only builds
            # when no KV cache exists: never let a model config with use_cache=True merge examples.
            return Trainer.compute_loss(
                self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch
            )
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # TRL's fused LM head (its loss, normalised by num_items_in_batch exactly as TRL's compute_loss does),
        # with its token-accuracy and entropy metrics summed on the device instead of read per micro-batch.
        outputs = model(**inputs, use_cache=False, fused_lm_head=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            self._counts[COUNTS.index("correct")] += outputs.is_top1.sum()
            self._counts[COUNTS.index("scored")] += outputs.label_mask.sum()
            self._entropy += outputs.entropy.detach().sum()
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients across ranks
        return loss

    def training_step(self, model, inputs, *args, **kwargs):
        self._count(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    @torch.no_grad()
    def _count(self, inputs: dict[str, torch.Tensor]) -> None:
        input_ids, mask, position_ids = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
        real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        packed = mask is None and position_ids is not None
        counts = self._counts
        counts[COUNTS.index("digest")] += token_digest(input_ids, real, counts[COUNTS.index("tokens")])
        counts[COUNTS.index("tokens")] += real.sum()
        counts[COUNTS.index("supervised")] += (inputs["labels"] != -100).sum()
        counts[COUNTS.index("examples")] += (position_ids == 0).sum() if packed else input_ids.shape[0]
        self.positions += input_ids.numel()

    def after_checkpoint(self, folder: Any) -> None:
        """Each rank's running counts go into the checkpoint too, so a resumed run's data digest covers the whole
        run: the same digest as an uninterrupted run proves it trained the same tokens in the same order (no
        example repeated or skipped across the resume)."""
        import json

        if folder.is_dir():
            state = {"counts": self.counts(), "positions": self.positions, "world_size": self.args.world_size}
            (folder / COUNTS_FILE.format(rank=self.args.process_index)).write_text(json.dumps(state) + "\n")

    def restore_counts(self, checkpoint: str) -> bool:
        """The counts a checkpoint saved for this rank (same world size only); False when there are none."""
        import json
        from pathlib import Path

        path = Path(checkpoint) / COUNTS_FILE.format(rank=self.args.process_index)
        if not path.is_file():
            return False
        state = json.loads(path.read_text())
        if state.get("world_size") != self.args.world_size:
            return False
        saved = state["counts"]
        self._counts.copy_(torch.tensor([saved.get(name, 0) for name in COUNTS], dtype=torch.int64))
        self.positions = state["positions"]
        return True

    def counts(self) -> dict[str, int]:
        """The running counts, read from the device (a synchronisation: at logging time and at the end only)."""
        return dict(zip(COUNTS, self._counts.tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self._throughput())
        super().log(logs, start_time)

    def _throughput(self) -> dict[str, float]:
        import time

        counts = self.counts()
        if counts["scored"]:  # what TRL's compute_loss logs, over the whole logging interval
            set_train_metric(self, "mean_token_accuracy", counts["correct"] / counts["scored"])
            set_train_metric(self, "entropy", self._entropy.item() / counts["scored"])
            self._counts[COUNTS.index("correct")] = self._counts[COUNTS.index("scored")] = 0
            self._entropy.zero_()
        now, last = time.perf_counter(), self._last_log
        self._last_log = (now, counts["tokens"])
        if last is None:  # the first interval includes start-up (and compilation): not a speed
            return {}
        tokens_per_second = (counts["tokens"] - last[1]) / max(now - last[0], 1e-9)
        speed = {"tokens_per_second": round(tokens_per_second, 1)}
        line = f"step {self.state.global_step}: {tokens_per_second:,.0f} tokens/s (this process)"
        if self.flops_per_token and self.peak_flops:
            speed["mfu"] = round(tokens_per_second * self.flops_per_token / self.peak_flops, 4)
            line += f", MFU {speed['mfu']:.1%} ({self.flops_per_token / 1e9:.1f} GFLOP/token)"
        log.info(line)
        return speed

    def data_line(self) -> str:
        counts = self.counts()
        padding = 1 - counts["tokens"] / max(self.positions, 1)
        digest = f"{counts['digest'] % 2**64:016x}"[:12]
        return (
            f"consumed {counts['examples']} examples, data digest {digest}; "
            f"{counts['supervised']:,} supervised of {self.positions:,} processed positions ({padding:.1%} padding)"
        )


def peak_flops() -> tuple[float, str] | None:
    """This GPU's dense bf16 peak (FLOP/s) and its name, from plan's table; None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    from hf_lora_recipe.planning.estimates import GPUS

    name = torch.cuda.get_device_name().replace(" ", "").upper()
    for key, (_, tflops) in sorted(GPUS.items(), key=lambda item: -len(item[0])):
        if key.split("-")[0].upper() in name:
            return tflops * 1e12, f"{key} {tflops:g} TFLOP/s"
    return None


def check_loraplus(optimizer: Any, model: Any, learning_rate: float, ratio: float) -> None:
    """Every lora_B learns at learning_rate x ratio and every lora_A at learning_rate, or the run stops."""
    rate = {id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
    for name, param in model.named_parameters():
        for matrix, expected in (("lora_A", learning_rate), ("lora_B", learning_rate * ratio)):
            if f".{matrix}." in name and param.requires_grad and not math.isclose(rate.get(id(param), -1), expected):
                raise RuntimeError(
                    f"LoRA+: {name} learns at {rate.get(id(param))}, not {expected:g} "
                    f"(learning_rate {learning_rate:g}, loraplus_lr_ratio {ratio:g})"
                )


class OptionsTookEffect(TrainerCallback):
    """Opt-in speed options that could silently do nothing prove they ran, or the run stops in one line.

    At start (:meth:`check_start`): the attention the model runs is the one chosen, and activation offloading,
    when on, wraps the step. After the first optimizer step: every decoder layer ran compiled (``compile``), Liger
    replaced module forwards (``use_liger_kernel``), and an ``auto`` micro-batch is what the trainer yielded.
    """

    def __init__(self, recipe: Recipe, accumulation: int, auto_micro_batch: bool):
        self.recipe, self.accumulation, self.auto_micro_batch = recipe, accumulation, auto_micro_batch
        self.trainer: RecipeTrainer | None = None
        self.examples_before: int | None = None
        self.checked = False

    def check_start(self, trainer: RecipeTrainer) -> None:
        self.trainer = trainer
        chosen, running = attention_for(self.recipe), attention_in_use(trainer.model)
        if running != chosen:
            raise RecipeError(
                f"attn_implementation: {chosen} was chosen but the model runs {running}; "
                "choose an attention this transformers supports for the model"
            )
        if offloading_active(self.recipe.activation_offloading) and isinstance(
            getattr(trainer, "maybe_activation_offload_context", None), (type(None), contextlib.nullcontext)
        ):
            raise RecipeError(
                "activation_offloading: true was asked, but the trainer wraps no step in TRL's "
                "offloading context; set activation_offloading false or report this"
            )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.auto_micro_batch and self.trainer is not None:
            self.examples_before = self.trainer.counts()["examples"]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.checked:
            return
        self.checked = True
        if self.recipe.compile:
            from hf_lora_recipe.model.compile_layers import check_compiled

            log.info(check_compiled(model))
        if liger_active(self.recipe.use_liger_kernel):
            log.info(check_liger(model))
        if self.examples_before is not None:
            self._check_micro_batch()

    def _check_micro_batch(self) -> None:
        trainer, size = self.trainer, self.recipe.per_device_train_batch_size
        dataset = trainer.train_dataset
        expected = size * self.accumulation
        if not hasattr(dataset, "__len__") or len(dataset) < expected * trainer.args.world_size:
            return  # a stream, or less data than one step: the step is not full
        got = trainer.counts()["examples"] - self.examples_before
        if got != expected:
            raise RecipeError(
                f"per_device_train_batch_size auto chose {size}, but step 1 trained {got} examples on this "
                f"process, not {size} x {self.accumulation}; set a number or report this"
            )
        log.info(f"micro-batch auto: step 1 trained {size} x {self.accumulation} examples per process, as chosen")


def check_liger(model: Any) -> str:
    """Liger's patching (applied by ``Trainer.train``) replaced module forwards with its kernels', or the run stops."""
    patched = sum(
        getattr(getattr(module, "forward", None), "__module__", "").startswith("liger_kernel")
        for module in model.modules()
    )
    if not patched:
        import transformers

        raise RecipeError(
            f"use_liger_kernel: true was asked, but no module runs a Liger forward after step 1 "
            f"(transformers {transformers.__version__}); set use_liger_kernel false or report this"
        )
    return f"liger-kernel: {patched} modules run Liger's forwards"


def build_trainer(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None,
    accumulation: int,
    callbacks: list[Any],
    flops_per_token: float | None = None,
    auto_micro_batch: bool = False,
) -> RecipeTrainer:
    peak = peak_flops()
    proof = OptionsTookEffect(recipe, accumulation, auto_micro_batch)
    trainer = RecipeTrainer(
        model=model,
        fused_loss=uses_fused_loss(recipe.lm_head_loss),
        flops_per_token=flops_per_token,
        peak_flops=peak[0] if peak else None,
        args=trainer_config(recipe, accumulation, has_eval=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[*callbacks, proof],
        loraplus_lr_ratio=recipe.loraplus_lr_ratio,
    )
    proof.check_start(trainer)
    return trainer
