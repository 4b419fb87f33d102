"""``hf-lora-recipe train --accelerate_config FILE``: check the run once, then start its processes.

Under ``accelerate launch`` every process runs the checks, and a refusal is printed by the main process and then
followed by the launcher's report of a failed worker (and a missing DeepSpeed is accelerate's ImportError before
any of ours). Here the launching process computes the variables accelerate would give its processes (engine,
world size), runs the same checks :func:`hf_lora_recipe.pipeline.train_run.run` starts with - so a refusal is one
line and exit 2, with no process started - and only then runs ``accelerate launch -m hf_lora_recipe.train`` with
the same arguments, whose exit code it returns.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from hf_lora_recipe import log
from hf_lora_recipe.recipe.schema import Recipe, RecipeError


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch(recipe: Recipe, train_argv: list[str], config_file: str, num_processes: int | None) -> int:
    """Check ``recipe`` as the launch's main process will, then run the launch; its exit code."""
    from hf_lora_recipe.pipeline.train_run import check_before_loading, check_launch
    from hf_lora_recipe.upstream.accelerate import launch_environment

    if not Path(config_file).expanduser().is_file():
        raise RecipeError(f"--accelerate_config {config_file}: no such file; give an accelerate config YAML")
    try:
        variables, world_size = launch_environment(str(Path(config_file).expanduser()), num_processes)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise RecipeError(f"--accelerate_config {config_file} cannot be read ({log.first_line(error)})") from None
    with _environment({**variables, "WORLD_SIZE": str(world_size)}):
        checked, launched = check_launch(recipe, launcher=True)
        start = check_before_loading(checked, launched)
    if start.finished:
        log.info(f"run complete: {start.finished}")
        return 0
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", config_file]
    command += [*(["--num_processes", str(num_processes)] if num_processes else []), "-m", "hf_lora_recipe.train"]
    log.info(f"checked for {launched.engine} on {world_size} processes: starting them with accelerate launch")
    return subprocess.call([*command, *train_argv])
