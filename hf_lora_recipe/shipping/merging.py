"""Fold an adapter into its base and write a standalone model, never over what merge did not write."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.files import replace_directory
from hf_lora_recipe.recipe.schema import Recipe, RecipeError, saved_recipe
from hf_lora_recipe.shipping.hub_upload import MERGE_MARKER, PUBLISHED, PUBLISHED_FOLDERS, check_repo_id
from hf_lora_recipe.shipping.model_card import card_tags


MERGE_INTO = ("dequantized", "original")
DTYPES = ("bfloat16", "float16", "float32")
MARKER_WRITER = "hf-lora-recipe merge"


def load_merge_base(base: str, recipe: Recipe | None, merge_into: str, dtype: Any) -> Any:
    """The base as dense weights: NF4-rounded (dequantized) or the original checkpoint."""
    from transformers import AutoModelForCausalLM

    from hf_lora_recipe.model.loading import quantization_config, torch_dtype

    if merge_into == "original":
        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    quantized = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch_dtype(recipe.bnb_4bit_compute_dtype), quantization_config=quantization_config(recipe)
    )
    # Quantization is deterministic, so these are exactly the weights the adapter saw during training.
    dense = quantized.dequantize(dtype=dtype)
    # dequantize() converts the 4-bit layers only: embeddings and norms would stay in the compute dtype and
    # config.json would name it, so the written checkpoint would mix dtypes and reload in the wrong one
    dense.to(dtype)
    dense.config.dtype = dtype
    return dense


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def merged_output_files(directory: Path) -> set[str] | None:
    """The names merge wrote into ``directory`` when it is a merged model of ours, else None (module docstring)."""
    marker = directory / MERGE_MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        files = record.get("files") if isinstance(record, dict) and record.get("written_by") == MARKER_WRITER else None
        if isinstance(files, list) and all(isinstance(name, str) for name in files):
            return {*files, MERGE_MARKER}
        return None
    card = directory / "README.md"
    if not (directory / "config.json").is_file() or not card.is_file() or card.is_symlink():
        return None
    if not {"hf-lora-recipe", "merged"} <= set(card_tags(card)):
        return None
    return {
        name
        for name in os.listdir(directory)
        if name in PUBLISHED_FOLDERS or any(fnmatch.fnmatchcase(name, p) for p in PUBLISHED)
    }


def _write_marker(staging: Path, adapter: str, base: str, merge_into: str, dtype: str) -> None:
    record = {
        "written_by": MARKER_WRITER,
        "adapter": adapter,
        "base": base,
        "merge_into": merge_into,
        "dtype": dtype,
        "files": sorted(p.name for p in staging.iterdir()),
    }
    (staging / MERGE_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def local_adapter(adapter: str) -> Path | None:
    """The adapter's folder (checked), or None for a Hub repo id; refuses anything else before a load."""
    path = Path(adapter).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecipeError(
                f"--adapter {adapter} is a file: give the adapter's folder (a training output_dir) or a Hub repo id"
            )
        if not (path / "adapter_config.json").is_file():
            raise RecipeError(f"--adapter {adapter}: no adapter_config.json there (is it a training output_dir?)")
        return path.resolve()
    if adapter.startswith((".", "/", "~")) or not _is_repo_id(adapter):
        raise RecipeError(
            f"--adapter {adapter}: no such folder, and not a Hub repo id; give the training "
            "output_dir or NAMESPACE/NAME"
        )
    return None


def _is_repo_id(name: str) -> bool:
    try:
        check_repo_id(name)
    except RecipeError:
        return False
    return True


def base_of(adapter_dir: Path) -> str:
    """``base_model_name_or_path`` from a local adapter's adapter_config.json, read without PEFT."""
    config_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"{config_path} cannot be read as JSON ({log.first_line(error)}): the adapter is damaged; "
            "re-save it from a checkpoint or retrain"
        ) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{config_path} names no base model (base_model_name_or_path): pass --base PATH_OR_REPO")
    return base


def check_base(base: str, source: str, fix: str = "pass --base PATH_OR_REPO") -> str:
    """A local base must exist; a repo id is left to the loader (it may be in the cache). ``fix``: what the
    command that asks can do about it."""
    path = Path(base).expanduser()
    if path.exists():
        return str(path)
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise RecipeError(f"{source}: the base model {base} is not there; {fix}")
    return base


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[str, list[int]]]:
    """Each adapted module of a saved adapter -> (which LoRA tensor, its shape), from the safetensors header."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    found: dict[str, tuple[str, list[int]]] = {}
    try:
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
                if module and part in ("A.weight", "B.weight"):
                    found[f"{module} lora_{part.split('.')[0]}"] = (module, list(weights.get_slice(key).get_shape()))
    except (OSError, ValueError, RuntimeError) as error:  # a missing or damaged file
        raise RecipeError(f"{path} cannot be read ({log.first_line(error)}): re-save the adapter or retrain") from None
    return found


def _target_parameter_shapes(module: Any, name: str, parameters: list[str]) -> list[tuple[int, ...]] | None:
    """The shapes of the target parameters ``module`` (the adapted module ``name``) holds, or None when the
    adapter adapts it as a module."""
    plain = name.replace(".base_layer", "")
    held = [
        tuple(getattr(module, target.rsplit(".", 1)[-1]).shape)
        for target in parameters
        if module is not None
        and (plain == target.rsplit(".", 1)[0] or plain.endswith("." + target.rsplit(".", 1)[0]))
        and getattr(module, target.rsplit(".", 1)[-1], None) is not None
    ]
    return held or None


def check_fits(adapter_dir: Path, model: str, flag: str, trust_remote_code: bool = False) -> None:
    """``model`` (a base, or a merged model) has every module the adapter adapts, at the adapter's sizes, and a
    vocabulary that holds the adapter's tokenizer: read from its config.json on the meta device, before any
    weight loads."""
    import torch
    from transformers import AutoTokenizer

    from hf_lora_recipe.model.loading import meta_model, read_model_config

    config = read_model_config(model, trust_remote_code=trust_remote_code, where=f"{flag} {model}")
    modules = dict(
        meta_model(config, Recipe(model_name_or_path=model, trust_remote_code=trust_remote_code)).named_modules()
    )
    saved_config = adapter_dir / "adapter_config.json"
    parameters = (
        (json.loads(saved_config.read_text()).get("target_parameters") or []) if saved_config.is_file() else []
    )
    for label, (name, shape) in adapter_shapes(adapter_dir).items():
        held = _target_parameter_shapes(modules.get(name.replace(".base_layer", "")), name, parameters)
        if held is not None:  # an experts module adapted through its 3-D parameters (PEFT target_parameters)
            if not any(shape[1 if label.endswith("lora_A") else 0] in sizes for sizes in held):
                raise RecipeError(
                    f"{flag} {model}: the parameters of {name} do not have the adapter's sizes: it is not the "
                    "adapter's base; give the base it was trained on"
                )
            continue
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            raise RecipeError(
                f"{flag} {model} has no linear layer {name}, which the adapter adapts: it is not the adapter's base "
                f"(a {type(config).__name__}); give the base it was trained on"
            )
        size, wanted = (module.in_features, shape[1]) if label.endswith("lora_A") else (module.out_features, shape[0])
        if size != wanted:
            side = "input" if label.endswith("lora_A") else "output"
            raise RecipeError(
                f"{flag} {model}: {name} has {size} {side} features, the adapter's {wanted}: it is not the "
                "adapter's base; give the base it was trained on"
            )
    vocabulary = config.get_text_config().vocab_size
    tokens = len(AutoTokenizer.from_pretrained(str(adapter_dir)))
    if tokens > vocabulary:
        raise RecipeError(
            f"{flag} {model} has {vocabulary} token rows, fewer than the adapter's tokenizer's {tokens}: it is not "
            "the adapter's base; give the base it was trained on"
        )


def check_output(
    output: str | Path,
    adapter_dir: Path | None,
    base: str | None,
    overwrite: bool,
    owned: Callable[[Path], set[str] | None] = merged_output_files,
    kind: str = "merged model",
    writer: str = "merge",
) -> Path:
    """``output`` made absolute, once everything in the module docstring's list allows writing there. ``owned``:
    the names ``writer`` wrote into a folder that holds a ``kind`` of ours, else None."""
    output = Path(os.path.abspath(Path(output).expanduser()))
    flag = f"--output {output}"
    if output.is_symlink():
        raise RecipeError(f"{flag} is a symbolic link: give the folder itself ({writer} never writes through a link)")
    if output.exists() and not output.is_dir():
        raise RecipeError(f"{flag} is an existing file: choose a new folder name ({writer} never replaces a file)")
    real = output.resolve()
    base_dir = Path(base).expanduser() if base and Path(base).expanduser().is_dir() else None
    for what, other in (("the adapter's folder", adapter_dir), ("the base model's folder", base_dir)):
        if other is None:
            continue
        other = other.resolve()
        if real == other:
            raise RecipeError(f"{flag} is {what}: writing there would destroy it; choose another --output")
        if other in real.parents:
            raise RecipeError(f"{flag} is inside {what} {other}: choose an --output outside it")
        if real in other.parents:
            raise RecipeError(f"{flag} contains {what} {other}: choose an --output that does not hold it")
    if output.is_dir():
        entries = sorted(os.listdir(output))
        ours = owned(output) if entries else set()
        if ours is None:
            raise RecipeError(
                f"{flag} is a folder that is not empty ({_names(entries)}) and not a {kind} "
                f"written by hf-lora-recipe: choose a new or empty folder ({writer} never replaces "
                "files it did not write)"
            )
        foreign = [name for name in entries if name not in ours]
        if foreign:
            raise RecipeError(
                f"{flag} holds a {kind} but also {_names(foreign)}, which {writer} did not "
                "write: move them out or choose another --output"
            )
        if entries and not overwrite:
            raise RecipeError(
                f"{flag} already holds a {kind}: pass --overwrite to replace it (atomically) "
                "or choose another --output"
            )
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RecipeError(f"{flag}: {ancestor} is a file, not a folder; choose another --output")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RecipeError(f"{flag}: cannot write in {ancestor} (permission denied); choose a folder you can write to")
    return output


def merge(
    adapter: str,
    output: str | Path,
    base: str | None = None,
    dtype: str = "bfloat16",
    merge_into: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge ``adapter`` into its base and write the model to ``output``; returns ``output``.

    Everything that can be refused (module docstring) is refused before anything heavy is imported or loaded.
    """
    if dtype not in DTYPES:
        raise RecipeError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    adapter_dir = local_adapter(adapter)
    if adapter_dir is not None:
        adapter = str(adapter_dir)
    base_given = base is not None
    if base is not None or adapter_dir is not None:
        source = "--base" if base is not None else f"{adapter_dir / 'adapter_config.json'}"
        base = check_base(base or base_of(adapter_dir), source)
    output = check_output(output, adapter_dir, base, overwrite)
    recipe = saved_recipe(adapter)
    if adapter_dir is not None:
        check_fits(
            adapter_dir, base, "--base" if base_given else "its base", bool(recipe and recipe.trust_remote_code)
        )
    quantized = bool(recipe and recipe.load_in_4bit)
    merge_into = merge_into or ("dequantized" if quantized else "original")
    if merge_into not in MERGE_INTO:
        raise RecipeError(f"--merge_into must be one of {', '.join(MERGE_INTO)}; got {merge_into!r}")
    if merge_into == "dequantized" and not quantized:
        raise RecipeError(
            "--merge_into dequantized is for QLoRA adapters; this one was trained on an unquantized base"
        )

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    from hf_lora_recipe.shipping.model_card import LOSS_PLOT, RESULTS_FILE, write_card
    from hf_lora_recipe.templates.llama2 import special_ids
    from hf_lora_recipe.templates.tokenizer import save_tokenizer
    from hf_lora_recipe.upstream.notices import quiet_libraries

    quiet_libraries()
    if base is None:  # an adapter on the Hub: its config names the base
        try:
            base = PeftConfig.from_pretrained(adapter).base_model_name_or_path
        except (OSError, ValueError) as error:
            raise RecipeError(
                f"--adapter {adapter}: not a local folder, and no adapter could be read from the Hub "
                f"({log.first_line(error)}); check the path or repo id (and HF_HUB_OFFLINE)"
            ) from None
    torch_dtype = getattr(torch, dtype)

    try:
        dense = load_merge_base(base, recipe, merge_into, torch_dtype)
    except OSError as error:
        raise RecipeError(
            f"cannot load the base model {base} ({log.first_line(error)}): pass --base PATH_OR_REPO"
        ) from None
    model = PeftModel.from_pretrained(dense, adapter)
    merged = model.merge_and_unload()
    leftover = [name for name in merged.state_dict() if "lora_" in name]
    if leftover:
        raise RuntimeError(f"merge left adapter tensors behind: {leftover[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    merged.config.use_cache = True
    # Generation must stop at the template's end-of-turn token (e.g. <|eot_id|>), which need not be the EOS.
    stop_ids = sorted({tokenizer.eos_token_id, special_ids(tokenizer).eos_id} - {None})
    merged.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    if not log.is_main_process():
        return output

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        merged.save_pretrained(staging, max_shard_size="5GB")
        save_tokenizer(tokenizer, staging)
        for name in ("recipe.yaml", RESULTS_FILE, LOSS_PLOT):
            source = Path(adapter) / name
            if source.is_symlink():  # never copy what a link points at: push would publish it as ours
                log.warn(f"not copied into the merged model: {source} is a symbolic link")
            elif source.is_file():
                shutil.copy(source, staging / name)
        merge_base = (
            f"dequantized NF4 weights of `{base}` (what the QLoRA adapter was trained against)"
            if merge_into == "dequantized"
            else f"original `{base}` weights ({dtype})"
        )
        write_card(staging, location=str(output), kind="merged", merge_base=merge_base)
        _write_marker(staging, adapter, base, merge_into, dtype)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the model from everyone else
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
