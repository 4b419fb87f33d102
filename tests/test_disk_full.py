"""A disk that refuses a write ends in one line and leaves what was there byte-identical (issue 23 item 4).

Each row runs one of our writes in its own process under a real file-size limit (``RLIMIT_FSIZE``: a write past
it fails with EFBIG, as a full disk fails with ENOSPC) through the commands' error handling, and asserts the exit
code, the one line, that every file it would have replaced is unchanged and that no partial file is left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO_ROOT
from .fixtures import build_adapter_dir


RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails the write with EFBIG instead of a signal
from hf_lora_recipe.recipe.cli_args import command
from pathlib import Path
folder = Path(sys.argv[1])

@command
def main(argv):
{body}
    return 0

resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(main([]))
"""


@dataclass(frozen=True)
class Row:
    id: str
    body: str  # the write, with ``folder`` the run folder under test
    limit: int  # bytes a file may grow to
    kept: tuple[str, ...]  # files under folder that must stay byte-identical


ROWS = [
    Row(
        "eval-records-its-report-in-card-and-results",
        "from hf_lora_recipe.shipping.model_card import write_evaluation\n"
        "write_evaluation(folder, {'response_loss': 1.0, 'dataset': 'x', 'split': 'test', 'examples': 1})",
        1000,
        ("README.md", "training_results.json"),
    ),
    Row(
        "card-re-rendered",
        "from hf_lora_recipe.shipping.model_card import write_card\nwrite_card(folder, str(folder))",
        1000,
        ("README.md",),
    ),
    Row(
        "tokenizer-saved-over-a-folder",
        "from hf_lora_recipe.templates.tokenizer import load_tokenizer, save_tokenizer\n"
        "from hf_lora_recipe.files import write_atomically\n"
        "tokenizer = load_tokenizer(str(folder))\n"
        "write_atomically(folder / 'tok', lambda partial: save_tokenizer(tokenizer, partial))",
        50_000,
        ("tok/tokenizer_config.json", "tok/tokenizer.json"),
    ),
]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def run_folder(tiny_base, tmp_path_factory):
    folder = build_adapter_dir(tiny_base, tmp_path_factory.mktemp("disk") / "adapter")
    shutil.copytree(folder, folder / "tok", ignore=shutil.ignore_patterns("checkpoint-*", "tok"))
    return folder


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_a_refused_write_is_one_line_and_changes_nothing(row, run_folder, tmp_path):
    folder = Path(shutil.copytree(run_folder, tmp_path / "run"))
    before = _digests(folder)
    script = RUNNER.format(body=textwrap.indent(row.body, "    "), limit=row.limit)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [PYTHON, "-c", script, str(folder)], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("hf-lora-recipe: error: the disk refused a write"), lines
    assert "File too large" in lines[0] and "Traceback" not in result.stderr
    assert _digests(folder) == before  # every file as it was, and nothing added (no partial left behind)
    for name in row.kept:
        assert (folder / name).is_file()


DISK_FULL_PUSH: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "truncated-weights",
        lambda folder: _truncate(folder / "adapter_model.safetensors"),
        "adapter_model.safetensors is incomplete (it holds",
    ),
    ("truncated-json", lambda folder: _truncate(folder / "adapter_config.json"), "adapter_config.json is incomplete"),
    ("card-cut-short", lambda folder: _cut_card(folder / "README.md"), "README.md is incomplete (the model card ends"),
]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _cut_card(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: text.index("## How to load")])
    (path.parent / "recipe.yaml").unlink()  # else push re-renders the card rather than upload it


@pytest.mark.parametrize("damage, phrase", [row[1:] for row in DISK_FULL_PUSH], ids=[row[0] for row in DISK_FULL_PUSH])
def test_push_refuses_a_half_written_folder_before_any_request(
    damage, phrase, run_folder, tmp_path, capsys, monkeypatch
):
    from hf_lora_recipe.commands.push import main as push_main

    folder = Path(shutil.copytree(run_folder, tmp_path / "run"))
    damage(folder)
    before = _digests(folder)
    monkeypatch.setenv("HF_TOKEN", "hf_not_used")  # the refusal comes before the token is read or any request
    code = push_main(["--path", str(folder), "--repo_id", "me/run", "--max_retries", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and phrase in err[0], err
    assert _digests(folder) == before


def test_a_checkpoint_the_disk_refuses_stops_train_in_one_line_and_the_rerun_goes_on(tiny_base, alpaca_path, tmp_path):
    """A real resume whose checkpoint-3 cannot be written (the tokenizer's 3.6 MB file passes the limit): one line,
    every earlier file unchanged; the rerun sets the half-written checkpoint aside and finishes."""
    from hf_lora_recipe.commands.train import main as train_main

    output_dir = tmp_path / "run"
    flags = [
        *("--model_name_or_path", str(tiny_base), "--dataset_name", str(alpaca_path), "--output_dir", str(output_dir)),
        *("--save_steps", "1", "--load_in_4bit", "false", "--bf16", "false", "--max_length", "64"),
        *("--global_batch_size", "4"),
    ]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(  # a process like the limited one: it fills the data cache that one then reads
        [PYTHON, "-m", "hf_lora_recipe.train", *flags, "--max_steps", "2"], capture_output=True, text=True, env=env
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digests(output_dir)
    body = "from hf_lora_recipe.commands.train import main as train\nreturn train(sys.argv[2:])"
    script = RUNNER.format(body=textwrap.indent(body, "    "), limit=1_000_000)
    result = subprocess.run(
        [PYTHON, "-c", script, str(output_dir), *flags, "--max_steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    # (Trainer's progress bar is still open: the error line follows it on the same terminal line)
    errors = [line for line in result.stderr.splitlines() if "hf-lora-recipe: error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and "the disk refused a write (File too large)" in errors[0], result.stderr[-3000:]
    after = _digests(output_dir)
    assert {name: digest for name, digest in after.items() if not name.startswith("checkpoint-3/")} == before
    assert (output_dir / "checkpoint-3").is_dir(), result.stderr[-3000:]  # the refused write was the checkpoint's
    assert not (output_dir / "checkpoint-3" / "hf_lora_recipe.json").exists()  # never marked complete

    assert train_main([*flags, "--max_steps", "3"]) == 0
    assert (output_dir / "incomplete-checkpoint-3").is_dir() and (output_dir / "checkpoint-3").is_dir()
