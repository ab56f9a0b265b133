"""resume.Work: the hidden checkpoint folder beside an output (fingerprint, resume, finish, discard)."""
from __future__ import annotations

import pytest
import torch

from skinaug import resume


class _Stop(Exception):
    pass


def test_a_run_with_the_same_fingerprint_resumes_and_another_starts_afresh(tmp_path, capsys):
    out = tmp_path / "ti"
    with pytest.raises(_Stop), resume.Work(out, {"seed": 0}) as work:
        assert work.state is None
        work.save({"step": 3, "rows": torch.arange(4.0)})
        (work.path / ".checkpoint.pt.999999.abcd.tmp.pt").write_bytes(b"cut short")  # a kill while saving
        raise _Stop
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ti.partial"]  # no lock file left
    with pytest.raises(_Stop), resume.Work(out, {"seed": 0}) as work:
        assert work.state["step"] == 3 and torch.equal(work.state["rows"], torch.arange(4.0))
        assert sorted(p.name for p in work.path.iterdir()) == [resume.CHECKPOINT, resume.FINGERPRINT]
        raise _Stop
    assert "resuming from" in capsys.readouterr().out
    with resume.Work(out, {"seed": 1}) as work:
        assert work.state is None and list(work.path.iterdir()) == [work.path / resume.FINGERPRINT]
        work.discard()
    assert list(tmp_path.iterdir()) == []


def test_finish_puts_the_folder_in_place_of_the_old_output(tmp_path):
    out = tmp_path / "lora"
    out.mkdir()
    (out / "stale.safetensors").write_text("an earlier run's")
    with resume.Work(out, {"seed": 0}) as work:
        work.save({"step": 1})
        (work.path / "lora.json").write_text("{}")
        work.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]
    assert sorted(p.name for p in out.iterdir()) == ["lora.json"]
