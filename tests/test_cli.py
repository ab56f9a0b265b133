"""The `skinaug` command line: every usage line in a module docstring parses (docs cannot drift).

Each module's docstring says how to run it (house style); those lines are read here from the
source and parsed by click exactly as the shell would pass them, so a renamed argument or option,
a dropped one or a missing required one fails this test.
"""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import click
import pytest
import torch

from skinaug.cli import main

PKG = Path(__file__).resolve().parents[1] / "src" / "skinaug"


def usage_lines() -> list[tuple[str, str]]:
    """(module path, command line) for every `skinaug ...` line of a module docstring, continuations joined."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = iter(doc.splitlines())
        for line in lines:
            if line.strip().startswith("skinaug "):
                while line.rstrip().endswith("\\"):
                    line = line.rstrip()[:-1] + " " + next(lines).strip()
                found.append((path.relative_to(PKG).as_posix(), line.strip()))
    return found


def parse(argv: list[str]) -> click.Context:
    """Parse argv as `skinaug` would, without running the command."""
    command = main.get_command(click.Context(main), argv[0])
    assert command is not None, f"no command {argv[0]!r}"
    return command.make_context(argv[0], argv[1:], parent=click.Context(main, info_name="skinaug"))


@pytest.mark.parametrize(("module", "line"), usage_lines(), ids=lambda v: v if "/" in v or v.endswith(".py") else None)
def test_every_usage_line_in_a_docstring_parses(module, line, tmp_path, monkeypatch):
    argv = shlex.split(line, comments=True)[1:]
    monkeypatch.chdir(tmp_path)
    for word in argv[1:]:  # paths that must exist (click.Path(exists=True)) do, as folders
        if not word.startswith("-"):
            (tmp_path / word).mkdir(parents=True, exist_ok=True)
    parse(argv)


def test_every_command_has_a_usage_line():
    documented = {shlex.split(line, comments=True)[1] for _, line in usage_lines()}
    assert set(main.commands) - documented == set()


def test_a_drifted_usage_line_fails(tmp_path, monkeypatch):
    """The check can fail: an option the command does not have, or a missing argument."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(click.UsageError):
        parse(["world", "data/world", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse(["tone", "data/splits/scenario1/seed0"])


def _out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB of which "
        "1.03 GiB is free. Including non-PyTorch memory, this process has 22.50 GiB memory in use.\nmore")


def _invoke_paper(command: str, tmp_path: Path, monkeypatch):
    """`skinaug COMMAND split images base out --seed 0` with the paper profile's settings."""
    from click.testing import CliRunner

    from skinaug import cli, config

    monkeypatch.setattr(cli, "_cfg", lambda ctx: config.compose("paper"))
    for name in ("split", "images", "base"):
        (tmp_path / name).mkdir()
    return CliRunner().invoke(main, [command, *(str(tmp_path / n) for n in ("split", "images", "base", "out")),
                                     "--seed", "0"])


@pytest.mark.parametrize(("command", "target", "setting"), [
    ("textual_inversion", "skinaug.diffusion.finetune.train_textual_inversion", "textual_inversion.tokens_per_pass"),
    ("generate", "skinaug.diffusion.generate.generate", "generate.batch_size"),
])
def test_running_out_of_gpu_memory_is_one_line_naming_the_setting(command, target, setting, tmp_path, monkeypatch):
    monkeypatch.setattr(target, _out_of_memory)
    result = _invoke_paper(command, tmp_path, monkeypatch)
    assert result.exit_code == 1 and result.exception is not None and not isinstance(result.exception, RuntimeError)
    (line,) = result.output.splitlines()
    assert line.startswith(f"Error: {command} ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB. "
                           "GPU 0 has a total capacity of 23.55 GiB of which 1.03 GiB is free):")
    assert setting in line and "Including" not in line


def test_other_runtime_errors_are_not_taken_for_running_out_of_memory(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr("skinaug.diffusion.finetune.train_textual_inversion", broken)
    result = _invoke_paper("textual_inversion", tmp_path, monkeypatch)
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "something else"
