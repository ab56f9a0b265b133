"""dvc.yaml is complete: every stage depends on every skinaug module its command runs.

A stage runs `skinaug <command>`: cli.py, the modules cli.py imports at its top, the modules that
command's function imports, and everything those import in turn (any import anywhere in a module
counts: the graph must never miss a change). The test derives that set from the source with `ast`
and compares it with each stage's `src/skinaug/**/*.py` deps, both ways, so an edit to a module re-runs
exactly the stages whose outputs it can change. Which params each stage declares is checked by
running DVC (tests/test_pipeline.py, changing one param at a time).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "skinaug"


def module_file(module: str) -> Path | None:
    """src/skinaug/a/b.py or src/skinaug/a/b/__init__.py for the dotted module "a.b" (None: not a module)."""
    base = PKG.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_packages(module: str) -> set[str]:
    """The module and every package above it (importing skinaug.a.b runs skinaug/a/__init__.py)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} | {"__init__"}


def skinaug_imports(tree: ast.AST) -> set[str]:
    """Dotted modules of the skinaug package imported anywhere in `tree` (top level or inside functions)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "skinaug":
            package = node.module.removeprefix("skinaug").removeprefix(".")
            for alias in node.names:  # `from skinaug.a import b`: module a.b, or the name b of module a
                sub = f"{package}.{alias.name}" if package else alias.name
                found.add(sub if module_file(sub) else (package or "__init__"))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("skinaug.") for alias in node.names if alias.name.startswith("skinaug.")}
    return set().union(*(_with_packages(m) for m in found)) if found else set()


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


def import_closure(start: set[str], seen: set[str] = frozenset()) -> set[str]:
    """Every skinaug module reached from `start` by imports, as dotted names ("__init__" for skinaug);
    the modules in `seen` count as reached but are not walked."""
    todo, seen = set(start), set(seen)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= skinaug_imports(ast.parse(module_file(module).read_text() if module != "__init__"
                                              else (PKG / "__init__.py").read_text()))
    return seen


def as_path(module: str) -> str:
    path = PKG / "__init__.py" if module == "__init__" else module_file(module)
    return path.relative_to(ROOT).as_posix()


def modules_run_by(command: str) -> set[str]:
    """Every skinaug module `skinaug <command>` can execute, as repository paths."""
    cli = ast.parse((PKG / "cli.py").read_text())
    top = ast.Module(body=[n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    start = skinaug_imports(top) | skinaug_imports(_command_functions(cli)[command]) | {"__init__"}
    return {as_path(m) for m in import_closure(start, seen={"cli"})}  # cli: only this command's part


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


def test_the_import_walk_sees_function_local_imports_and_packages():
    """The base stage imports the tiny model only inside its function: that still counts, and so
    does each package's __init__.py above a module."""
    assert "demo.tinymodel" in skinaug_imports(ast.parse((PKG / "diffusion/base.py").read_text()))
    assert {"src/skinaug/diffusion/finetune.py", "src/skinaug/diffusion/__init__.py"} <= modules_run_by("lora")
    assert "src/skinaug/diffusion/finetune.py" not in modules_run_by("report")


def _graph() -> dict[str, set[str]]:
    modules = ["__init__" if p == PKG / "__init__.py" else
               ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
               for p in sorted(PKG.rglob("*.py"))]
    return {m: skinaug_imports(ast.parse((PKG / "__init__.py" if m == "__init__" else module_file(m)).read_text()))
            - {m} - set(_with_packages(m)) for m in modules}


def test_no_import_cycle():
    """Modules form layers: none imports, even inside a function, one that imports it back."""
    graph, done, path = _graph(), set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module not in done:
            path.append(module)
            for other in sorted(graph.get(module, ())):
                visit(other)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_report_needs_no_torch():
    """`skinaug report` reads metrics files: none of the modules it runs may import torch (or what
    imports it), so the report neither loads nor depends on the classifiers and the diffusion code."""
    heavy = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft")
    for path in sorted(modules_run_by("report")):
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in heavy], f"{path} imports {names}"


@pytest.mark.parametrize("study", ["splits", "textual_inversion", "lora", "reference"])
def test_the_ablations_scenario_1_stages_are_the_studys_in_scenario_1(study):
    """What the ablation reads in scenario 1 the study's stage makes, and in scenarios 2 and 3 DVC's run
    cache hands it back from there: only the same command, deps, params and outs make that true."""
    ours = stages()[f"ablation_{study}"]
    theirs = json.loads(json.dumps(stages()[study]).replace("${scenario}", "1"))
    assert ours["matrix"] == {"seed": "${ablation.trains}"} and theirs["matrix"] == {"seed": "${splits.seeds}"}
    if study == "splits":  # scenario 1 is written into the ablation's command, not read from params
        theirs["params"] = [p for p in theirs["params"] if p != "scenario"]
    assert {k: v for k, v in ours.items() if k != "matrix"} == {k: v for k, v in theirs.items() if k != "matrix"}
