from __future__ import annotations

import time
from pathlib import Path

import pytest

from hf_lora_recipe.cli import COMMANDS

from .conftest import CLI, PYTHON, REPO_ROOT, run_cli


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
    flat = " ".join(result.stdout.split())
    assert "--lora_r INT adapter rank r" in flat and "(default: 16; positive)" in flat
    assert "--global_batch_size INT examples per optimizer step" in flat and "(default: 128; positive)" in flat


def test_unknown_command_suggests_the_nearest():
    result = run_cli(CLI, "trian")
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr


# The stage folders, lowest first: a module may import its own stage and the stages before it, never one after.
# `log`, `files` and `upstream` are the foundation every stage uses; the pipeline runs the stages; commands sit on top.
STAGES = [
    "log",
    "files",
    "upstream",
    "recipe",
    "templates",
    "data",
    "distributed",
    "model",
    "inits",
    "planning",
    "training",
    "shipping",
    "evaluation",
    "pipeline",
    "devtools",
    "commands",
]
ENTRY_POINTS = {"hf_lora_recipe", "__main__", "cli", "train"}  # the package, `python -m`, the CLI, the launch shim


def module_files() -> dict[str, Path]:
    package = REPO_ROOT / "hf_lora_recipe"
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hf_lora_recipe"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions), read from the source."""
    import ast

    modules = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 or stage_of(module) == "upstream", f"{module}: relative import"
                base = node.module or ""
                if node.level:
                    base = "hf_lora_recipe.upstream" + (f".{base}" if base else "")
                for name in [base, *(f"{base}.{alias.name}" for alias in node.names)]:
                    if name in modules and name != module:
                        found.add(name)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in modules}
        graph[module] = found
    return graph


def test_every_module_lives_in_a_stage_folder():
    loose = {m for m in module_files() if stage_of(m) not in STAGES and stage_of(m) not in ENTRY_POINTS}
    assert not loose, f"modules outside the stage folders: {sorted(loose)}"


def test_no_import_cycle_and_nothing_imports_a_command():
    from graphlib import TopologicalSorter

    graph = import_graph()
    TopologicalSorter(graph).prepare()  # raises CycleError on any cycle
    for module, imported in graph.items():
        if stage_of(module) != "commands" and module not in ENTRY_POINTS | {"hf_lora_recipe.train"}:
            commands = {m for m in imported if stage_of(m) == "commands"}
            assert not commands, f"{module} imports command module(s) {commands}"
        if stage_of(module) == "commands":
            others = {m for m in imported if stage_of(m) == "commands"}
            assert not others, f"{module} imports another command {others}"


def stage_back_edges() -> set[tuple[str, str]]:
    back = set()
    for module, imported in import_graph().items():
        if stage_of(module) not in STAGES:
            continue
        for target in imported:
            if stage_of(target) in STAGES and STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)):
                back.add((module, target))
    return back


def test_lower_stages_never_import_higher_ones():
    assert stage_back_edges() == set()


def test_quiet_filters_hide_exactly_the_listed_upstream_notices():
    import logging
    import warnings

    from hf_lora_recipe.upstream.notices import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        quiet_libraries()  # idempotent
        for message in (
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6.",
        ):
            warnings.warn_explicit(
                message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils"
            )
    assert [str(w.message) for w in caught] == [
        "`gradient_checkpointing_enable` is deprecated and will be removed in v6."
    ]

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        logger.warning("some other bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other bitsandbytes warning"]
    assert len(list(logger.filters)) == 1


def _message_text(node) -> str | None:
    """A raised message as written: literal text, each ``{...}`` field as a short value."""
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "{..}" for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message_text(node.left), _message_text(node.right)
        return None if left is None or right is None else left + right
    return _message_text(node.body) if isinstance(node, ast.IfExp) else None


def test_every_error_says_what_is_wrong_first_in_under_120_characters():
    """The first sentence of each raised message - up to a full stop or semicolon, or the first reason (': ',
    ' (', ', which', ', so') after its opening key - names the problem briefly; the reason and the fix follow."""
    import ast
    import re

    long = []
    for path in sorted((REPO_ROOT / "hf_lora_recipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            text = _message_text(node.exc.args[0])
            if text is None:
                continue
            first = re.split(r"; |\. (?=[A-Z])", text)[0]
            reasons = [m.start() for m in re.finditer(r": | \(|, which |, so ", first) if m.start() >= 30]
            first = first[: reasons[0]] if reasons else first
            if len(first) > 120:
                long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {first}")
    assert not long, "\n".join(long)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_numeric_flag_declares_its_range(name):
    """A command's int/float flag is added with add_number, so parse checks it is finite and in range."""
    import importlib

    from hf_lora_recipe.recipe.schema import FIELDS
    from hf_lora_recipe.upstream.argparse import actions

    parser = importlib.import_module(f"hf_lora_recipe.commands.{name}").PARSER
    numeric = {a.dest for a in actions(parser) if a.type in (int, float) and a.dest not in FIELDS}
    assert numeric <= set(parser.number_bounds), f"{name}: {sorted(numeric - set(parser.number_bounds))} unbounded"
