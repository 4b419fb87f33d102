"""Export an adapter for llama.cpp, Ollama and LM Studio: a GGUF LoRA for any GGUF of its base, or (``merged``)
the merged model as one GGUF, written by llama.cpp's own converters, with an Ollama Modelfile beside it.

llama.cpp's converters rather than a writer of ours: they own the tensor naming and the per-architecture
reshaping (fused QKV, permuted Q/K for RoPE, tied embeddings) that llama.cpp's loader expects, for every
architecture llama.cpp supports; a writer of ours would re-implement that table and drift from it.

What llama.cpp cannot represent is refused before anything loads: DoRA (no magnitude vector in its LoRA), LoRA
on 3-D expert parameters or extra trained modules (modules_to_save), and per-module alphas (its LoRA holds one
alpha; ranks may differ per tensor). rsLoRA's scale alpha/sqrt(r) is written as the alpha llama.cpp divides
by r. The output folder follows merge's rules (never over files we did not write), with its own marker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.files import cache_root, replace_directory
from hf_lora_recipe.recipe.schema import RecipeError
from hf_lora_recipe.shipping.merging import base_of, check_base, check_output, local_adapter, merge
from hf_lora_recipe.upstream import llama_cpp


EXPORT_MARKER = ".hf-lora-recipe-export"
MARKER_WRITER = "hf-lora-recipe export"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class Exported:
    """What one export wrote (paths inside ``folder``) and what llama.cpp runs it on."""

    folder: Path
    model: Path  # the file llama.cpp loads: the merged GGUF, or the base GGUF the LoRA applies to
    lora: Path | None  # the GGUF LoRA (None for a merged export)
    adapter_dir: Path
    base: str  # the base model folder the adapter was trained on


# ------------------------------------------------------------------ the converters


def cached_converters() -> Path:
    return cache_root() / f"llama.cpp-converters-{llama_cpp.CONVERTER_VERSION}"


def converters_dir(given: str | None) -> Path:
    """The folder holding llama.cpp's converters: ``given``, else ``$LLAMA_CPP_DIR``, else the cache."""
    source = given or os.environ.get(LLAMA_CPP_ENV)
    folder = Path(source).expanduser() if source else cached_converters()
    missing = [name for name in llama_cpp.CONVERTER_FILES[:4] if not (folder / name).exists()]
    if missing:
        where = f"--llama_cpp {source}" if given else f"${LLAMA_CPP_ENV}={source}" if source else f"the cache {folder}"
        raise RecipeError(
            f"{where} has no llama.cpp converters ({', '.join(missing)}): pass --fetch_converters (pip downloads "
            f"llama-cpp-python {llama_cpp.CONVERTER_VERSION}'s source) or --llama_cpp DIR, a llama.cpp checkout"
        )
    return folder


def fetch_converters(sdist: str | None = None) -> Path:
    """The converters extracted from llama-cpp-python's source package (``sdist``, else downloaded by pip) into the
    cache, once; returns their folder."""
    target = cached_converters()
    if (target / llama_cpp.CONVERTER_FILES[0]).is_file():
        return target
    version = llama_cpp.CONVERTER_VERSION
    with tempfile.TemporaryDirectory() as scratch:
        if sdist is None:
            log.info(f"downloading llama-cpp-python {version}'s source package (~75 MB) for its converters")
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
            done = subprocess.run(
                [*command, f"llama-cpp-python=={version}", "-d", scratch], capture_output=True, text=True
            )
            found = sorted(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
            if done.returncode or not found:
                raise RecipeError(
                    f"pip could not download llama-cpp-python {version}'s source "
                    f"({log.first_line(done.stderr.strip() or 'no file')}): check the network, or pass --llama_cpp DIR"
                )
            sdist = str(found[0])
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        staging = Path(scratch) / "converters"
        try:
            with tarfile.open(sdist) as archive:
                members = [
                    member
                    for member in archive.getmembers()
                    if member.name.startswith(prefix)
                    and member.name[len(prefix) :].split("/")[0] in llama_cpp.CONVERTER_FILES
                    and (member.isfile() or member.isdir())
                ]
                for member in members:
                    member.name = member.name[len(prefix) :]
                archive.extractall(staging, members=members, filter="data")
        except (OSError, tarfile.TarError) as error:
            raise RecipeError(
                f"--fetch_converters {sdist}: not a readable source package ({log.first_line(error)})"
            ) from None
        if not (staging / llama_cpp.CONVERTER_FILES[0]).is_file():
            raise RecipeError(
                f"--fetch_converters {sdist}: no llama.cpp converters inside; give llama-cpp-python {version}'s source"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)
    log.info(f"llama.cpp's converters are in {target}")
    return target


# ------------------------------------------------------------------ what can be exported


def check_exportable(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, when llama.cpp's LoRA can hold it (module docstring)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"a {config.get('peft_type')} adapter, not LoRA"),
        (config.get("use_dora"), "DoRA (llama.cpp's LoRA has no magnitude vector)"),
        (config.get("target_parameters"), "LoRA on 3-D expert parameters (target_parameters)"),
        (config.get("modules_to_save"), f"fully trained modules ({', '.join(config.get('modules_to_save') or [])})"),
        (config.get("alpha_pattern"), "per-module alphas (alpha_pattern; llama.cpp's LoRA holds one alpha)"),
        (
            config.get("use_rslora") and config.get("rank_pattern"),
            "rsLoRA with per-module ranks (llama.cpp scales by alpha/r with one alpha)",
        ),
    ]
    for refused, what in refusals:
        if refused:
            raise RecipeError(f"--adapter {adapter_dir}: {what} cannot be exported to GGUF; export it with --merged")
    return config


def check_architecture(base: Path, converters: Path) -> str:
    """The base's architecture, when llama.cpp's converter knows it."""
    try:
        architectures = json.loads((base / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"{base / 'config.json'} cannot be read ({log.first_line(error)}): pass --base PATH"
        ) from None
    known = llama_cpp.supported_architectures(converters)
    if not architectures or architectures[0] not in known:
        name = architectures[0] if architectures else "no architecture"
        raise RecipeError(
            f"the base {base} is a {name}, which llama.cpp's converter ({converters}) cannot write as GGUF; "
            "serve the adapter with transformers or vLLM instead"
        )
    return architectures[0]


def exported_files(directory: Path) -> set[str] | None:
    """The names export wrote into ``directory`` when it is an export of ours, else None."""
    marker = directory / EXPORT_MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == MARKER_WRITER else None
    if isinstance(files, list) and all(isinstance(name, str) for name in files):
        return {*files, EXPORT_MARKER}
    return None


def check_base_gguf(path: str | None) -> Path | None:
    if path is None:
        return None
    found = Path(path).expanduser()
    if not found.is_file():
        raise RecipeError(f"--base_gguf {path}: no such file; give the GGUF of the adapter's base model")
    with found.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise RecipeError(f"--base_gguf {path} is not a GGUF file (no GGUF magic); give the base model's GGUF")
    return found.resolve()


# ------------------------------------------------------------------ writing


def _rescaled_adapter(adapter_dir: Path, config: dict[str, Any], scratch: Path) -> Path:
    """The adapter as llama.cpp reads it: rsLoRA's scale alpha/sqrt(r) as an alpha it divides by r."""
    if not config.get("use_rslora"):
        return adapter_dir
    copy = scratch / "adapter"
    copy.mkdir()
    (copy / "adapter_model.safetensors").symlink_to(adapter_dir / "adapter_model.safetensors")
    rank = config["r"]
    rescaled = {**config, "use_rslora": False, "lora_alpha": config["lora_alpha"] * math.sqrt(rank)}
    (copy / "adapter_config.json").write_text(json.dumps(rescaled))
    return copy


def _write_marker(staging: Path, adapter: Path, base: str, merged: bool, quant: str) -> None:
    record = {
        "written_by": MARKER_WRITER,
        "adapter": str(adapter),
        "base": base,
        "merged": merged,
        "quant": quant,
        "files": sorted(p.name for p in staging.iterdir()),
    }
    (staging / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def _chat_metadata(tokenizer: Any) -> dict[str, Any]:
    """The keys that make a GGUF carry the adapter's chat template and end-of-turn token."""
    from hf_lora_recipe.templates.llama2 import special_ids

    eot = special_ids(tokenizer).eos_id
    return {"tokenizer.chat_template": tokenizer.chat_template, "tokenizer.ggml.eot_token_id": eot}


@dataclass(frozen=True)
class ExportPlan:
    """An export every check has passed (module docstring), ready to write."""

    adapter_dir: Path
    config: dict[str, Any]  # the adapter's adapter_config.json
    base: str  # the base model's folder
    base_gguf: Path | None
    folder: Path
    converters: Path
    merged: bool
    quant: str
    tokenizer: Any
    pieces: Any  # shipping/ollama.TurnPieces for the Modelfile, or None for none


def plan_export(
    adapter: str,
    output: str,
    base: str | None = None,
    base_gguf: str | None = None,
    merged: bool = False,
    quant: str = "f16",
    llama_cpp_dir: str | None = None,
    overwrite: bool = False,
    modelfile: bool = True,
) -> ExportPlan:
    """Everything refusable, refused before a model loads or a file is written."""
    from hf_lora_recipe.shipping.ollama import check_pieces, turn_pieces

    if quant not in llama_cpp.QUANTS:
        raise RecipeError(f"--quant must be one of {', '.join(llama_cpp.QUANTS)}; got {quant!r}")
    adapter_dir = local_adapter(adapter)
    if adapter_dir is None:
        raise RecipeError(
            f"--adapter {adapter}: export reads a local adapter folder; download it first "
            f"(huggingface-cli download {adapter} --local-dir DIR)"
        )
    config = check_exportable(adapter_dir)
    source = "--base" if base is not None else f"{adapter_dir / 'adapter_config.json'}"
    base = check_base(base or base_of(adapter_dir), source)
    if not Path(base).is_dir():
        raise RecipeError(f"{source}: the base {base} is not a local folder; download it and pass --base DIR")
    base_file = check_base_gguf(base_gguf)
    folder = check_output(output, adapter_dir, base, overwrite, exported_files, "GGUF export", "export")
    converters = converters_dir(llama_cpp_dir)
    check_architecture(Path(base), converters)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    pieces = None
    if modelfile:
        pieces = turn_pieces(tokenizer, runtime_adds_bos=_adds_bos(base_file, tokenizer))
        check_pieces(tokenizer, pieces)
    return ExportPlan(adapter_dir, config, base, base_file, folder, converters, merged, quant, tokenizer, pieces)


def write_export(plan: ExportPlan) -> Exported:
    """Convert and write ``plan`` into a staging folder beside its output, renamed into place when complete."""
    from hf_lora_recipe.shipping.ollama import modelfile as modelfile_text
    from hf_lora_recipe.upstream.gguf import add_metadata

    folder, quant, converters = plan.folder, plan.quant, plan.converters
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.scratch-") as scratch:
            scratch_dir = Path(scratch)
            lora_name, model_name = None, None
            if plan.merged:
                # into the original weights: a GGUF base is its own quantization, never bitsandbytes' NF4
                model_name = f"model-{quant}.gguf"
                merged_dir = merge(
                    str(plan.adapter_dir), scratch_dir / "merged", plan.base, dtype="float32", merge_into="original"
                )
                _convert(
                    converters, "convert_hf_to_gguf.py", merged_dir, staging / model_name, quant, "the merged model"
                )
            else:
                lora_name = f"adapter-{quant}.gguf"
                adapter_dir = _rescaled_adapter(plan.adapter_dir, plan.config, scratch_dir)
                what = f"the adapter {plan.adapter_dir}"
                _convert(
                    converters,
                    "convert_lora_to_gguf.py",
                    adapter_dir,
                    staging / lora_name,
                    quant,
                    what,
                    ["--base", plan.base],
                )
                if (
                    plan.base_gguf is None
                ):  # a base of the same precision, so the folder runs (and verifies) on its own
                    model_name = f"base-{quant}.gguf"
                    convert_base(converters, plan.base, quant, staging / model_name)
            for name in filter(None, (lora_name, model_name)):
                add_metadata(staging / name, _chat_metadata(plan.tokenizer), scratch_dir)
        model_path = folder / model_name if model_name else plan.base_gguf
        if plan.pieces is not None:
            source = f"./{model_name}" if model_name else str(plan.base_gguf)
            text = modelfile_text(source, f"./{lora_name}" if lora_name else None, plan.pieces, _stops(plan.tokenizer))
            (staging / MODELFILE).write_text(text)
        _write_marker(staging, plan.adapter_dir, plan.base, plan.merged, quant)
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        replace_directory(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(folder, model_path, folder / lora_name if lora_name else None, plan.adapter_dir, plan.base)


def _convert(
    converters: Path, script: str, source: Path, target: Path, quant: str, what: str, extra: list[str] | None = None
) -> None:
    log.info(f"llama.cpp's {script}: {what} -> {target.name} ({quant})")
    arguments = [*(extra or []), "--outfile", str(target), "--outtype", quant, str(source)]
    failure = llama_cpp.run_converter(converters, script, arguments)
    if failure is not None:
        raise RecipeError(f"llama.cpp's {script} could not convert {what}: {failure}")


def _adds_bos(base_gguf: Path | None, tokenizer: Any) -> bool:
    """Whether llama.cpp puts a BOS in front of a prompt itself: the base GGUF's ``tokenizer.ggml.add_bos_token``,
    or, for a GGUF converted here, whether the tokenizer adds one (what the converter writes there)."""
    if base_gguf is None:
        ids = tokenizer("x")["input_ids"]
        return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    from hf_lora_recipe.upstream.gguf import read_metadata

    return bool(read_metadata(base_gguf).get("tokenizer.ggml.add_bos_token", True))


def _stops(tokenizer: Any) -> list[str]:
    from hf_lora_recipe.templates.llama2 import special_ids

    return [tokenizer.convert_ids_to_tokens(special_ids(tokenizer).eos_id)]


def add_to_export(folder: Path, name: str, text: str) -> None:
    """Write ``name`` into an export of ours and list it in the marker, so a later --overwrite may replace it."""
    from hf_lora_recipe.files import write_atomically

    marker = folder / EXPORT_MARKER
    record = json.loads(marker.read_text())
    write_atomically(folder / name, lambda partial: partial.write_text(text))
    record["files"] = sorted({*record["files"], name})
    write_atomically(marker, lambda partial: partial.write_text(json.dumps(record, indent=2) + "\n"))


def convert_base(converters: Path, base: str, quant: str, target: Path) -> Path:
    """The base as a GGUF at ``quant`` (what a merged export's verification measures its floor with)."""
    _convert(converters, "convert_hf_to_gguf.py", Path(base), target, quant, f"the base {base}")
    return target
