"""The backbone stage: the demo's web-pretrained classifier backbones, and how classifiers load them.

Tiny corpora (32 photos, one or two epochs) on the CPU, seconds each; nothing touches the network.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from skinaug import SkinaugError, config, hashing
from skinaug.classify import backbone, classifiers
from skinaug.cli import main
from skinaug.demo import backbone as pretraining
from test_classifiers import small_cfg, write_study


@pytest.fixture(autouse=True)
def checkpoint_every_epoch(monkeypatch):
    monkeypatch.setattr(classifiers, "CHECKPOINT_EVERY_S", 0.0)


def world_cfg(**backbone_changes) -> config.Config:
    """small_cfg with pretrained world backbones, trained on 32 web photos for one epoch."""
    cfg = small_cfg(pretrained=True, freeze_backbone=True)
    changes = {"source": "world", "corpus": 32, "epochs": 1, "lr": 1e-3, "seed": 0}
    cfg = config.replace(cfg, backbone=config.replace(cfg.backbone, **{**changes, **backbone_changes}))
    return config.replace(cfg, ablation=config.replace(cfg.ablation, arch="resnet18"),
                          quality=config.replace(cfg.quality, arch="resnet18"))


def test_the_stage_writes_one_backbone_per_needed_arch_and_its_record(tmp_path):
    cfg = world_cfg()
    assert pretraining.write(tmp_path / "bb", cfg) == ["resnet18"]
    assert sorted(p.name for p in (tmp_path / "bb").iterdir()) == ["resnet18.json", "resnet18.pt"]
    record = json.loads((tmp_path / "bb" / "resnet18.json").read_text())
    assert record["recipe"]["source"] == "world" and record["recipe"]["backbone"]["corpus"] == 32
    assert record["sha256"] == hashing.file_digest(tmp_path / "bb" / "resnet18.pt")
    state = torch.load(tmp_path / "bb" / "resnet18.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)  # no head: the study's is new


def test_a_classifier_starts_from_the_file_frozen_with_a_new_head(tmp_path):
    cfg = world_cfg()
    pretraining.write(tmp_path / "bb", cfg)
    path = backbone.weights_file(cfg, tmp_path / "bb", "resnet18")
    state = torch.load(path, weights_only=True)
    model = classifiers.build_classifier("resnet18", 7, True, True, 32, weights=path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.0.weight", "fc.0.bias",
                                                                         "fc.3.weight", "fc.3.bias"]
    random = classifiers.build_classifier("resnet18", 7, False, True, 32)
    assert not torch.equal(random.state_dict()["conv1.weight"], state["conv1.weight"])


def test_pretraining_is_seeded_and_a_rerun_keeps_the_finished_file(tmp_path, capsys):
    cfg = world_cfg()
    pretraining.write(tmp_path / "a", cfg)
    pretraining.write(tmp_path / "b", cfg)
    first = (tmp_path / "a" / "resnet18.pt").read_bytes()
    assert (tmp_path / "b" / "resnet18.pt").read_bytes() == first
    inode = (tmp_path / "a" / "resnet18.pt").stat().st_ino
    pretraining.write(tmp_path / "a", cfg)
    assert "already made this way; kept" in capsys.readouterr().out
    assert (tmp_path / "a" / "resnet18.pt").stat().st_ino == inode
    pretraining.write(tmp_path / "a", world_cfg(seed=1))  # another recipe: trained again
    assert (tmp_path / "a" / "resnet18.pt").read_bytes() != first


def test_an_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = world_cfg(epochs=2)
    pretraining.write(tmp_path / "whole", cfg)
    real_fit = classifiers.fit

    def stopped_after_one(*args, **kwargs):
        def stop(epoch):
            if epoch == 1:
                raise KeyboardInterrupt
        return real_fit(*args, **kwargs, on_epoch=stop)

    monkeypatch.setattr(classifiers, "fit", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        pretraining.write(tmp_path / "cut", cfg)
    assert not (tmp_path / "cut" / "resnet18.pt").exists() and not (tmp_path / "cut" / "resnet18.json").exists()
    epochs = []
    monkeypatch.setattr(classifiers, "fit", lambda *a, **k: real_fit(*a, **k, on_epoch=epochs.append))
    pretraining.write(tmp_path / "cut", cfg)
    assert epochs == [2]  # only the second epoch ran again
    assert (tmp_path / "cut" / "resnet18.pt").read_bytes() == (tmp_path / "whole" / "resnet18.pt").read_bytes()


def test_imagenet_or_no_pretraining_leaves_only_the_record(tmp_path):
    pretraining.write(tmp_path / "bb", world_cfg())
    imagenet = world_cfg(source="imagenet")
    pretraining.write(tmp_path / "bb", imagenet)
    assert [p.name for p in (tmp_path / "bb").iterdir()] == ["resnet18.json"]  # the stale world file is gone
    assert json.loads((tmp_path / "bb" / "resnet18.json").read_text()) == {"arch": "resnet18", "source": "imagenet"}
    assert backbone.weights_file(imagenet, None, "resnet18") is None  # torchvision's weights
    scratch = config.replace(small_cfg(), quality=config.replace(small_cfg().quality, arch="resnet18"),
                             ablation=config.replace(small_cfg().ablation, arch="resnet18"))
    pretraining.write(tmp_path / "none", scratch)  # classify.pretrained false
    assert json.loads((tmp_path / "none" / "resnet18.json").read_text())["source"] is None
    assert backbone.weights_file(scratch, None, "resnet18") is None


def test_adding_an_arch_trains_only_its_own(tmp_path, capsys):
    cfg = world_cfg()
    pretraining.write(tmp_path / "bb", cfg)
    before = (tmp_path / "bb" / "resnet18.json").read_bytes()
    more = config.replace(cfg, ablation=config.replace(cfg.ablation, arch="vgg16"))
    assert pretraining.write(tmp_path / "bb", more) == ["resnet18", "vgg16"]
    assert "resnet18.pt is already made this way; kept" in capsys.readouterr().out
    assert (tmp_path / "bb" / "resnet18.json").read_bytes() == before  # its classifier stages stay done
    assert (tmp_path / "bb" / "vgg16.pt").is_file()
    pretraining.write(tmp_path / "bb", cfg)
    assert sorted(p.name for p in (tmp_path / "bb").iterdir()) == ["resnet18.json", "resnet18.pt"]


def test_every_arch_a_stage_builds_gets_a_backbone():
    cfg = world_cfg()
    cfg = config.replace(cfg, ablation=config.replace(cfg.ablation, arch="vgg16"))
    assert backbone.needed_archs(cfg) == ["resnet18", "vgg16"]


def test_missing_backbones_are_refused_with_the_fix(tmp_path):
    cfg = world_cfg()
    with pytest.raises(SkinaugError, match="pass --backbone DIR"):
        backbone.weights_file(cfg, None, "resnet18")
    with pytest.raises(SkinaugError, match=r"resnet18.pt not found: run the backbone stage first \(`dvc repro"):
        backbone.weights_file(cfg, tmp_path, "resnet18")


@pytest.mark.parametrize("content", [b"not a checkpoint", "vgg16"])
def test_a_file_that_is_no_backbone_of_the_arch_is_refused(tmp_path, content):
    path = tmp_path / "resnet18.pt"
    if content == "vgg16":
        torch.save(classifiers.build_classifier("vgg16", 7, False, False).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(SkinaugError, match="re-run the backbone stage") as caught:
        classifiers.build_classifier("resnet18", 7, True, True, 32, weights=path)
    assert "\n" not in str(caught.value)


def test_the_cli_trains_from_the_stage_folder_and_refuses_without_it(tmp_path):
    cfg = world_cfg()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    result = CliRunner().invoke(main, ["--params", str(params), "backbone", str(tmp_path / "bb")])
    assert result.exit_code == 0, result.output
    assert "backbone: resnet18: pretrained on the demo world's web corpus ->" in result.output
    study = write_study(tmp_path / "study")
    args = ["--params", str(params), "classify", str(study["split_dir"]), str(study["images_dir"]),
            str(tmp_path / "m.json"), "--arch", "resnet18", "--train-type", "real", "--seed", "0"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "pass --backbone DIR" in refused.output
    assert not (tmp_path / "m.json").exists()
    result = CliRunner().invoke(main, [*args, "--backbone", str(tmp_path / "bb")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m.json").read_text())
    assert record["pretrained"] is True and record["backbone"] == "world"
