from __future__ import annotations

import time

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
    assert "--lora_r INT adapter rank r" in flat and "(default: 16)" in flat
    assert "--global_batch_size INT examples per optimizer step" in flat and "(default: 128)" in flat


def test_unknown_command_suggests_the_nearest():
    result = run_cli(CLI, "trian")
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr


COMMAND_MODULES = {
    "__main__",
    "cli",
    "train",
    "preview",
    "merge",
    "push",
    "generate",
    "plan",
    "demo",
    "evaluation",
    "realbase",
}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions), read from the source."""
    import ast

    package = REPO_ROOT / "hf_lora_recipe"
    graph: dict[str, set[str]] = {}
    modules = {path.stem for path in package.glob("*.py")} - {"__init__", "__main__"}
    for path in sorted(package.glob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_lora_recipe."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = found & modules
    return graph


def test_imports_flow_one_way_and_no_command_module_is_imported_from_below():
    from graphlib import TopologicalSorter

    graph = import_graph()
    order = list(TopologicalSorter(graph).static_order())  # raises CycleError on any cycle
    assert order.index("config") < order.index("data") < order.index("train")
    assert not graph["config"], "config imports nothing of ours"
    for module, imported in graph.items():
        if module not in COMMAND_MODULES:
            assert not imported & COMMAND_MODULES, f"{module} imports command module(s) {imported & COMMAND_MODULES}"
    for command in ("merge", "push", "generate", "plan", "preview"):
        assert "train" not in graph[command]


def test_quiet_filters_hide_exactly_the_listed_upstream_notices():
    import logging
    import warnings

    from hf_lora_recipe.quiet import quiet_libraries

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
