from __future__ import annotations

import time

import pytest

from hf_lora_recipe.cli import COMMANDS

from .conftest import CLI, PYTHON, run_cli


def test_help_lists_every_command_and_is_instant():
    started = time.perf_counter()
    result = run_cli(CLI, "--help")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0
    for name in ("train", "preview", "merge", "push", "generate", "plan"):
        assert f"  {name}" in result.stdout
    assert elapsed < 5, f"--help took {elapsed:.1f}s: a heavy import leaked into the CLI module"


def test_cli_module_imports_no_heavy_library():
    code = "import sys, hf_lora_recipe.cli, hf_lora_recipe.train; print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    assert run_cli(PYTHON, "-c", code).stdout.strip() == "[]"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name):
    result = run_cli(CLI, name, "--help")
    assert result.returncode == 0
    assert name in (result.stdout + result.stderr)


def test_train_help_lists_recipe_keys():
    result = run_cli(CLI, "train", "--help")
    assert "--lora_r 16" in result.stdout and "--global_batch_size 128" in result.stdout


def test_unknown_command_suggests_the_nearest():
    result = run_cli(CLI, "trian")
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr
