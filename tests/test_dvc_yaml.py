"""dvc.yaml is complete: every stage depends on every skinaug module its command runs.

A stage runs `skinaug <command>`: cli.py, the modules cli.py imports at its top, the modules that
command's function imports, and everything those import in turn (any import anywhere in a module
counts: the graph must never miss a change). The test derives that set from the source with `ast`
and compares it with each stage's `src/skinaug/*.py` deps, both ways, so an edit to a module re-runs
exactly the stages whose outputs it can change. Which params each stage declares is checked by
running DVC (tests/test_pipeline.py, changing one param at a time).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "skinaug"


def skinaug_imports(tree: ast.AST) -> set[str]:
    """Modules of the skinaug package imported anywhere in `tree` (top level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "skinaug":
            found |= {alias.name for alias in node.names if (PKG / f"{alias.name}.py").is_file()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skinaug."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("skinaug.")}
    return found


def _command_functions(cli: ast.Module) -> dict[str, ast.FunctionDef]:
    """`skinaug` command name -> its function in cli.py (@main.command() or @main.command("name"))."""
    commands = {}
    for node in cli.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and getattr(deco.func, "attr", None) == "command":
                named = [a.value for a in deco.args if isinstance(a, ast.Constant)]
                commands[named[0] if named else node.name] = node
    return commands


def modules_run_by(command: str) -> set[str]:
    """Every skinaug module `skinaug <command>` can execute, as repository paths."""
    cli = ast.parse((PKG / "cli.py").read_text())
    top = ast.Module(body=[n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    todo = skinaug_imports(top) | skinaug_imports(_command_functions(cli)[command]) | {"__init__"}
    seen = {"cli"}
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= skinaug_imports(ast.parse((PKG / f"{module}.py").read_text()))
    return {f"src/skinaug/{m}.py" for m in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_stage_depends_on_exactly_the_modules_its_command_runs(name):
    stage = stages()[name]
    words = stage["cmd"].split()
    assert words[0] == "skinaug", f"{name}: the command is not skinaug's"
    declared = {d for d in stage["deps"] if isinstance(d, str) and d.startswith("src/")}
    needed = modules_run_by(words[1])
    assert not needed - declared, f"{name} misses deps {sorted(needed - declared)}"
    assert not declared - needed, f"{name} depends on modules its command never runs: {sorted(declared - needed)}"


def test_the_import_walk_sees_function_local_imports():
    """diffusion imports tinymodel only inside the base stage's function: that still counts."""
    assert "tinymodel" in skinaug_imports(ast.parse((PKG / "diffusion.py").read_text()))
    assert "src/skinaug/finetune.py" in modules_run_by("lora")
    assert "src/skinaug/finetune.py" not in modules_run_by("report")
