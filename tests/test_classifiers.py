"""Classifiers: heads, frozen backbones, offline weights, sampler, validation hold-out, metrics, runs.

Everything runs on the CPU in seconds with random weights; nothing touches the network
(the autouse fixture below makes any torch hub download fail).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
import yaml
from click.testing import CliRunner
from PIL import Image

from dvcrepo import start_two_waiting
from skinaug import SkinaugError, config
from skinaug.classify import classifiers, scoring
from skinaug.cli import main

ROOT = Path(__file__).resolve().parents[1]
LABELS = config.load(ROOT / "params.yaml").subset.labels


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, and downloads that fail as they would without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.fixture(autouse=True)
def checkpoint_every_epoch(monkeypatch):
    """Tests stop runs after a given epoch and expect its checkpoint: save after every epoch."""
    monkeypatch.setattr(classifiers, "CHECKPOINT_EVERY_S", 0.0)


def read_live(live_dir: Path) -> dict[str, pd.DataFrame]:
    """A DVCLive folder's curves: metric name (train/loss, val/accuracy_pct, ...) -> its TSV (step, value)."""
    metrics = Path(live_dir) / "plots" / "metrics"
    return {str(p.relative_to(metrics).with_suffix("")): pd.read_csv(p, sep="\t") for p in sorted(metrics.rglob("*.tsv"))}


def live_bytes(live_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(live_dir)): p.read_bytes() for p in sorted(Path(live_dir).rglob("*")) if p.is_file()}


def small_cfg(**classify_changes) -> config.Config:
    """The real params.yaml with a classifier small enough for a test."""
    cfg = config.load(ROOT / "params.yaml")
    changes = {"archs": ["resnet18"], "pretrained": False, "freeze_backbone": True, "epochs": 2, "batch_size": 16,
               "image_size": 36, "crop_size": 32, "selection": "last"}
    return config.replace(cfg, classify=config.replace(cfg.classify, **{**changes, **classify_changes}))


def write_study(root: Path, per_label_train: int = 4, per_label_test: int = 2, syn_per_source: int = 1) -> dict:
    """A split folder, an images folder and a synthetic folder with a manifest, all tiny."""
    rng = np.random.default_rng(0)
    split_dir, images_dir, syn_dir = root / "split", root / "images", root / "syn"
    for d in (split_dir, images_dir, syn_dir / "images"):
        d.mkdir(parents=True)

    def image(label_id: int) -> Image.Image:
        base = np.full((40, 48, 3), 30 * label_id, dtype=np.uint8)  # a label you can see
        return Image.fromarray(np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8))

    def rows(name: str, per_label: int, scales: list[int]) -> pd.DataFrame:
        out = []
        for i, label in enumerate(LABELS):
            for k in range(per_label):
                md5 = f"{name}{i}{k:02d}".ljust(32, "0")
                image(i).save(images_dir / f"{md5}.jpg")
                out.append({"md5hash": md5, "fitzpatrick_scale": scales[k % len(scales)], "label": label})
        df = pd.DataFrame(out)
        df.to_csv(split_dir / f"{name}.csv", index=False)
        return df

    train = rows("train", per_label_train, [1, 2, 5, 6])
    rows("test", per_label_test, [5, 6])
    rows("flex_light", 1, [1, 2])
    manifest = []
    for _, r in train.iterrows():
        for k in range(syn_per_source):
            file = f"images/{r.md5hash}_{k}.png"
            image(LABELS.index(r.label)).resize((32, 32)).save(syn_dir / file)
            manifest.append({"file": file, "source_md5hash": r.md5hash, "label": r.label, "fitzpatrick_scale": 5,
                             "prompt": "p", "seed": k, "strength": 0.5, "guidance": 2.0, "steps": 20})
    pd.DataFrame(manifest).to_csv(syn_dir / "manifest.csv", index=False)
    return {"split_dir": split_dir, "images_dir": images_dir, "syn_dir": syn_dir}


# --- the network ---------------------------------------------------------------------------

HEADS = {"vgg16": "classifier.6.", "resnet18": "fc.", "vit_b_16": "heads.head."}


@pytest.mark.parametrize("arch", classifiers.ARCHS)
def test_frozen_backbone_gives_seven_log_probs_and_only_the_head_trains(arch):
    torch.manual_seed(0)
    model = classifiers.build_classifier(arch, 7, pretrained=False, freeze_backbone=True)
    size, n = (224, 1) if arch == "vit_b_16" else (32, 2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(HEADS[arch]) for name in trainable)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randn(n, 3, size, size))
    assert out.shape == (n, 7)
    assert torch.allclose(out.exp().sum(1), torch.ones(n))  # log-probabilities
    torch.nn.functional.nll_loss(out, torch.arange(n)).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in trainable)


def test_unfrozen_backbone_trains_everything_and_vit_takes_small_images():
    model = classifiers.build_classifier("vit_b_16", 7, pretrained=False, freeze_backbone=False, image_size=32)
    assert all(p.requires_grad for p in model.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_a_3x3_convolution_on_a_1x1_map_uses_its_centre_tap_and_computes_the_same():
    """ResNet-18's last stage sees 1 x 1 maps at 32 px: there it convolves with the kernel's centre
    tap (oneDNN's 3 x 3 backward is 20 times slower); outputs and gradients are the plain model's."""
    torch.manual_seed(0)
    model = classifiers.build_classifier("resnet18", 7, pretrained=False, freeze_backbone=False)
    plain = torchvision.models.resnet18()
    plain.fc = classifiers.reference_head(512, 7)
    assert model.state_dict().keys() == plain.state_dict().keys()  # still torchvision's model
    plain.load_state_dict(model.state_dict())
    assert type(model.layer4[1].conv2) is classifiers.CentreTapConv2d
    assert type(model.conv1) is torch.nn.Conv2d  # 7 x 7, stride 2: left alone
    model.eval(), plain.eval()
    x = torch.randn(4, 3, 32, 32)
    out, out_plain = model(x), plain(x)
    assert torch.allclose(out, out_plain, atol=1e-5)
    out[:, 0].sum().backward()
    out_plain[:, 0].sum().backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name
    assert model.layer4[1].conv2.weight.grad[:, :, 0].abs().sum() == 0  # the padding taps learn nothing
    conv = model.layer1[0].conv1  # on a 2 x 2 map every tap sees the input: the plain convolution
    y = torch.randn(2, 64, 2, 2)
    assert torch.equal(conv(y), torch.nn.functional.conv2d(y, conv.weight, padding=1))


def test_missing_weights_offline_say_where_to_put_them(tmp_path):
    with pytest.raises(SkinaugError) as err:
        classifiers.build_classifier("resnet18", 7, pretrained=True, freeze_backbone=True)
    message = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "classify.pretrained: false" in message and "\n" not in message


def test_preplaced_weights_load_without_network(tmp_path):
    reference = classifiers.build_classifier("resnet18", 7, pretrained=False, freeze_backbone=False)
    # torchvision's resnet18 file holds the 1000-class ImageNet fc
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    state |= {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / "resnet18-f37072fd.pth")
    model = classifiers.build_classifier("resnet18", 7, pretrained=True, freeze_backbone=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


# --- data, sampler, augmentation -------------------------------------------------------------

def test_sampler_balances_labels_over_a_drawn_epoch():
    counts = [700, 350, 140, 70, 35, 21, 14]  # the biggest class is 53 % of the data
    targets = torch.repeat_interleave(torch.arange(7), torch.tensor(counts))
    order = classifiers.balanced_order(targets, torch.Generator().manual_seed(0))
    assert len(order) == len(targets)
    shares = torch.bincount(targets[order], minlength=7) / len(order)
    assert torch.all((shares - 1 / 7).abs() < 0.04), shares


def test_val_rule_never_trains_on_held_out_images_or_their_offspring(tmp_path):
    study = write_study(tmp_path, per_label_train=6, per_label_test=1, syn_per_source=2)
    train = pd.read_csv(study["split_dir"] / "train.csv")
    manifest = pd.read_csv(study["syn_dir"] / "manifest.csv")
    for train_type in config.TRAIN_TYPES:
        items, val = classifiers.training_items(train, manifest, train_type, study["images_dir"], study["syn_dir"],
                                             "val", 0.3, seed=42)
        assert not set(items.md5hash) & set(val.md5hash)
        assert (val.kind == "real").all() and len(val) == 7 * 2  # round(0.3 * 6) per label
        assert val.label.value_counts().to_dict() == {label: 2 for label in LABELS}
        expected = {"real": 28, "syn": 56, "real_syn": 84}[train_type]
        assert len(items) == expected
    items, val = classifiers.training_items(train, manifest, "real_syn", study["images_dir"], study["syn_dir"],
                                         "last", 0.3, seed=42)
    assert val is None and len(items) == 42 + 84


def test_holdout_is_seeded_and_keeps_every_label_in_training():
    rows = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 2 + ["c"]})
    held = classifiers.stratified_holdout(rows, 0.15, seed=1)
    assert held.tolist() == classifiers.stratified_holdout(rows, 0.15, seed=1).tolist()
    assert rows[held].label.value_counts().to_dict() == {"a": 2, "b": 1}  # c has one image: it stays


def test_warp_matches_torchvision_transforms():
    size, crop = 64, 56
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([128 + 100 * torch.sin(xx / 7), 128 + 100 * torch.cos(yy / 9), (xx + yy) * 1.0])[None]
    angle = 10.0
    ours = classifiers.warp(image, classifiers.whole_canvas(image), torch.tensor([[5.0, 3.0, 50.0, 58.0]]),
                         torch.tensor([math.radians(angle)]), torch.tensor([True]), size, crop)
    ref = TF.resized_crop(image, top=3, left=5, height=58, width=50, size=[size, size])
    ref = TF.center_crop(TF.horizontal_flip(TF.rotate(ref, angle, TF.InterpolationMode.BILINEAR)), [crop, crop])
    assert (ours - ref).abs().mean() < 0.5  # out of 255: equal up to interpolation at the corners


def smooth_photo(path: Path, width: int, height: int) -> torch.Tensor:
    """A non-square photo without fine detail (resampling twice stays close to resampling once), saved as PNG."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    photo = torch.stack([128 + 100 * torch.sin(xx / 11), 128 + 100 * torch.cos(yy / 9), (xx + yy) * 1.6])
    photo = photo.round().clamp(0, 255).to(torch.uint8)
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(path)
    return photo


@pytest.mark.parametrize("box, angle, flip, tolerance", [
    ((0, 0, 90, 60), 0.0, False, 1.0),  # the whole photo: every pixel within 1 of torchvision's
    ((5, 3, 80, 55), 10.0, True, None),  # rotated: the fill's edge differs, so compare means
])
def test_warp_of_a_whole_non_square_photo_matches_torchvision(tmp_path, box, angle, flip, tolerance):
    size, crop = 36, 32
    photo = smooth_photo(tmp_path / "p.png", 90, 60)
    canvas, frames = classifiers.decode_frames([str(tmp_path / "p.png")], size)
    assert frames.tolist() == [[90, 60, 45, 36]]  # shorter side 36, longer 54 capped at 36 / 0.8
    ours = classifiers.warp(canvas, frames, torch.tensor([box], dtype=torch.float64),
                         torch.tensor([math.radians(angle)]), torch.tensor([flip]), size, crop)
    x0, y0, w, h = box
    ref = TF.rotate(TF.resized_crop(photo.float()[None], y0, x0, h, w, [size, size]), angle,
                    TF.InterpolationMode.BILINEAR)
    ref = TF.center_crop(TF.horizontal_flip(ref) if flip else ref, [crop, crop])
    diff = (ours - ref).abs()
    assert diff.max() < tolerance if tolerance else diff.mean() < 1.5, (diff.mean(), diff.max())


def get_params_boxes(width: int, height: int, n: int) -> torch.Tensor:
    """n boxes (x0, y0, w, h) from torchvision's own RandomResizedCrop(scale=(0.8, 1)).get_params."""
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    draws = (torchvision.transforms.RandomResizedCrop.get_params(image, [0.8, 1.0], [3 / 4, 4 / 3]) for _ in range(n))
    return torch.tensor([[j, i, w, h] for i, j, h, w in draws], dtype=torch.float64)


@pytest.mark.parametrize("width, height", [(400, 300), (300, 400), (470, 300)])
def test_boxes_follow_torchvision_get_params_over_the_whole_frame(width, height):
    """Same distribution as get_params: box position and size, and how often all 10 tries fail
    (470 x 300: about 86 % of the time), falling back to the 4:3 centre."""
    n = 2000
    ours = classifiers.random_resized_boxes(torch.tensor([[width, height]]).repeat(n, 1), torch.Generator().manual_seed(0))
    ref = get_params_boxes(width, height, n)
    x0, y0, w, h = ours.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
    assert (x0 == 0).any() and (x0 + w == width).any()  # the whole frame is reachable, both edges
    for k in range(4):
        se = math.sqrt(ours[:, k].var() / n + ref[:, k].var() / n)
        assert abs(ours[:, k].mean() - ref[:, k].mean()) < 5 * se + 1e-9, k
    fallback = torch.tensor([(width - min(width, round(height * 4 / 3))) // 2, 0, min(width, round(height * 4 / 3)),
                             height], dtype=torch.float64)
    share = {name: (boxes == fallback).all(1).double().mean().item() for name, boxes in (("ours", ours), ("ref", ref))}
    assert abs(share["ours"] - share["ref"]) < 0.03, share
    tried = ~(ours == fallback).all(1)
    assert (w * h)[tried].min() >= 0.8 * width * height - (w + h)[tried].max()  # >= 80 % of the area, up to rounding


@pytest.mark.parametrize("width, height", [(900, 300), (300, 900), (500, 297)])
def test_boxes_of_a_panorama_are_torchvision_centre_fallback_exactly(width, height):
    """Wider than 5:3 (or taller than 3:5) no draw fits: get_params returns its clamped-ratio centre crop."""
    ours = classifiers.random_resized_boxes(torch.tensor([[width, height]]).repeat(50, 1), torch.Generator().manual_seed(0))
    assert torch.equal(ours, get_params_boxes(width, height, 50))


def test_training_crops_reach_the_edges_of_a_wide_photo(tmp_path):
    """A red strip along the left edge of a 4:3 photo: the centre square (the test view, and the
    training cache before whole frames) cuts it off; training crops of the whole frame see it."""
    photo = np.full((36, 48, 3), 128, dtype=np.uint8)
    photo[:, :5] = (255, 0, 0)
    Image.fromarray(photo).save(tmp_path / "wide.png")
    items = pd.DataFrame({"path": [str(tmp_path / "wide.png")] * 200, "label": LABELS[0]})
    train = classifiers.load_set(items, LABELS, 36, torch.device("cpu"), whole=True)
    test = classifiers.load_set(items.head(1), LABELS, 36, torch.device("cpu"))

    def red(x: torch.Tensor) -> torch.Tensor:  # per image: any pixel clearly red after normalisation
        return ((x[:, 0] > 1.5) & (x[:, 1] < -1.5)).flatten(1).any(1)

    assert not red(classifiers.normalise(test.images.float() / 255)).any()
    seen = red(classifiers.augment(train.images, train.frames, 36, 32, torch.Generator().manual_seed(0)))
    assert 0.05 < seen.float().mean() < 0.95


def test_augment_draws_parameters_per_image_and_is_seeded():
    images = torch.randint(0, 255, (1, 3, 36, 36), dtype=torch.uint8).repeat(6, 1, 1, 1)
    frames = classifiers.whole_canvas(images)
    a = classifiers.augment(images, frames, 36, 32, torch.Generator().manual_seed(3))
    b = classifiers.augment(images, frames, 36, 32, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert len({tuple(x.flatten()[:50].tolist()) for x in a}) == 6


# --- the epoch loop ------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the reference's order
def test_lr_schedule_steps_at_the_start_like_the_reference_or_at_the_end():
    start, end = classifiers.lr_schedule(1e-3, 30, "start"), classifiers.lr_schedule(1e-3, 30, "end")
    assert start == pytest.approx([1e-3] * 9 + [1e-4] * 10 + [1e-5] * 10 + [1e-6])
    assert end == pytest.approx([1e-3] * 10 + [1e-4] * 10 + [1e-5] * 10)
    assert classifiers.lr_schedule(1e-3, 4, "start") == pytest.approx([1e-4, 1e-5, 1e-6, 1e-7])  # the demo's trap
    assert classifiers.lr_schedule(1e-3, 4, "end") == pytest.approx([1e-3, 1e-4, 1e-5, 1e-6])
    for lr_step, epochs in (("start", 30), ("end", 30), ("start", 7)):  # torch's StepLR stepped the same way
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
        used = []
        for _ in range(epochs):
            if lr_step == "start":
                scheduler.step()
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if lr_step == "end":
                scheduler.step()
        assert classifiers.lr_schedule(1e-3, epochs, lr_step) == pytest.approx(used)


def test_reference_rule_chooses_an_epoch_for_each_test_set(monkeypatch):
    """The ablation tests one classifier on flex_light and flex_dark: each test set gets the epoch
    of its own lowest loss after epoch 10, not the first set's, and that epoch's predictions."""
    losses = {"flex_light": [0.1] * 10 + [0.9, 0.5, 0.7, 0.8], "flex_dark": [0.1] * 10 + [0.9, 0.8, 0.6, 0.4]}
    tests = {name: classifiers.ImageSet(torch.zeros(3, 3, 36, 36, dtype=torch.uint8), torch.zeros(3, dtype=torch.long),
                                     None) for name in losses}
    epochs_seen = dict.fromkeys(losses, 0)

    def scripted_evaluate(model, data, batch_size, crop_size):
        name = next(n for n, test in tests.items() if test is data)
        epochs_seen[name] += 1
        return losses[name][epochs_seen[name] - 1], torch.full((3,), epochs_seen[name])  # predictions name their epoch

    monkeypatch.setattr(classifiers, "evaluate", scripted_evaluate)
    monkeypatch.setattr(classifiers, "train_one_epoch", lambda *args: (0.0, 0.0))
    curve, chosen, preds = classifiers.fit(torch.nn.Linear(1, 1), None, None, tests,
                                        small_cfg(selection="test_reference", epochs=14), seed=0)
    assert chosen == {"flex_light": 12, "flex_dark": 14}  # epochs 1-10 are lower still, but too early
    assert preds["flex_light"].tolist() == [12] * 3 and preds["flex_dark"].tolist() == [14] * 3
    assert [r["test_loss_flex_dark"] for r in curve] == losses["flex_dark"]
    assert [r["test_accuracy_pct_flex_dark"] for r in curve] == [0.0] * 14  # predictions name the epoch, targets 0
    assert classifiers.live_values(curve[0]) == {"train/lr": curve[0]["lr"], "train/loss": 0.0,
                                              "train/accuracy_pct": 0.0, "flex_light/loss": 0.1,
                                              "flex_light/accuracy_pct": 0.0, "flex_dark/loss": 0.1,
                                              "flex_dark/accuracy_pct": 0.0}


# --- metrics -------------------------------------------------------------------------------

def test_score_against_hand_computed_values():
    labels = ["a", "b", "c", "d"]  # d never occurs: scikit-learn's zero_division=0 counts it as 0
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = scoring.score(y_true, y_pred, labels, fitzpatrick_scale=[5, 5, 6, 6, 6, 5])
    # a: p 2/2 r 2/3 f1 .8; b: p 1/2 r 1/2 f1 .5; c: p 1/2 r 1/1 f1 2/3; d: 0 0 0
    assert m["accuracy_pct"] == pytest.approx(100 * 4 / 6)
    assert m["precision_pct"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 4)
    assert m["recall_pct"] == pytest.approx(100 * (2 / 3 + 0.5 + 1) / 4)
    assert m["f1_pct"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 4)
    assert m["per_label"]["c"] == pytest.approx({"precision_pct": 50, "recall_pct": 100, "f1_pct": 200 / 3, "support": 1})
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["accuracy_pct_by_fitzpatrick_scale"] == pytest.approx({"5": 100, "6": 100 / 3})
    assert m["n_test_by_fitzpatrick_scale"] == {"5": 3, "6": 3} and m["n_test"] == 6


# --- whole runs ----------------------------------------------------------------------------

def test_run_end_to_end_with_validation_selection(tmp_path):
    study = write_study(tmp_path)
    out = tmp_path / "metrics" / "resnet18_real_syn.json"
    (record,) = classifiers.run(study["split_dir"], study["images_dir"], study["syn_dir"], {"test": out}, "resnet18",
                             "real_syn", small_cfg(selection="val", val_fraction=0.25), seed=0,
                             live_dir=tmp_path / "live")
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["n_val"] == 7 and record["n_train"] == {"real": 21, "syn": 21, "total": 42}
    assert record["selection"]["rule"] == "val" and record["selection"]["honest"]
    assert "curve" not in record  # the curve is DVCLive's
    live = read_live(tmp_path / "live")
    # an honest rule never looks at the test set: no test curve
    assert sorted(live) == ["train/accuracy_pct", "train/loss", "train/lr", "val/accuracy_pct", "val/loss"]
    assert all(curve.step.tolist() == [1, 2] for curve in live.values())
    assert live["train/lr"].lr.tolist() == pytest.approx([1e-3, 1e-4])  # demo params: lr_step end
    val = live["val/loss"]
    assert record["chosen_epoch"] == val.step[val.loss.idxmin()]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["val"]["loss"] == val.loss.iloc[-1]
    assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["metrics.json", "plots"]  # no dvc.yaml, no report
    assert sum(map(sum, record["confusion_matrix"])) == record["n_test"] == 14
    assert set(record["accuracy_pct_by_fitzpatrick_scale"]) == {"5", "6"}
    assert 0 <= record["accuracy_pct"] <= 100


def test_cli_runs_the_reference_rule_and_labels_it(tmp_path):
    study = write_study(tmp_path)
    cfg = small_cfg(selection="test_reference", epochs=2, lr_step="start")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    out = tmp_path / "m.json"
    args = ["--params", str(params), "classify", str(study["split_dir"]), str(study["images_dir"]), str(out),
            "--syn-dir", str(study["syn_dir"]), "--arch", "resnet18", "--train-type", "syn", "--seed", "1",
            "--live-dir", str(tmp_path / "live")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["selection"]["rule"] == "test_reference" and not record["selection"]["honest"]
    assert "TEST" in record["selection"]["label"] and "test_reference" in result.output
    assert record["n_train"] == {"real": 0, "syn": 28, "total": 28}
    live = read_live(tmp_path / "live")
    assert live["test/loss"].step.tolist() == [1, 2] and "test/accuracy_pct" in live
    assert live["train/lr"].lr.tolist() == pytest.approx([1e-4, 1e-5])  # stepped before each epoch
    test = live["test/loss"]
    assert record["chosen_epoch"] == test.step[test.loss.idxmin()]
    first, first_live = out.read_bytes(), live_bytes(tmp_path / "live")
    assert CliRunner().invoke(main, args).exit_code == 0
    # seeded: a rerun trains the same model and writes the same bytes (no timestamp in the curve)
    assert out.read_bytes() == first and live_bytes(tmp_path / "live") == first_live


def test_cli_epochs_override_classify_epochs_and_zero_keeps_them(tmp_path):
    """The ablation passes --epochs ${ablation.epochs}: its classifiers may train longer than the study's."""
    study = write_study(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(small_cfg(epochs=1))))
    for epochs, expected in ((3, 3), (0, 1)):
        out = tmp_path / f"m{epochs}.json"
        args = ["--params", str(params), "classify", str(study["split_dir"]), str(study["images_dir"]), str(out),
                "--syn-dir", str(study["syn_dir"]), "--arch", "resnet18", "--train-type", "syn", "--seed", "1",
                "--epochs", str(epochs), "--live-dir", str(tmp_path / f"live{epochs}")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        record = json.loads(out.read_text())
        assert record["epochs"] == record["chosen_epoch"] == expected
        assert read_live(tmp_path / f"live{epochs}")["train/loss"].step.tolist() == list(range(1, expected + 1))


def test_one_training_run_scores_several_test_sets(tmp_path):
    study = write_study(tmp_path)
    test = pd.read_csv(study["split_dir"] / "test.csv")
    test.head(4).to_csv(study["split_dir"] / "flex_dark.csv", index=False)
    outputs = {"test": tmp_path / "m_test.json", "flex_dark": tmp_path / "m_flex_dark.json"}
    first, second = classifiers.run(study["split_dir"], study["images_dir"], None, outputs, "resnet18", "real",
                                 small_cfg(selection="test_reference", epochs=3), seed=0, live_dir=tmp_path / "live")
    assert (first["test_name"], second["test_name"]) == ("test", "flex_dark")
    assert (first["n_test"], second["n_test"]) == (len(test), 4)
    live = read_live(tmp_path / "live")  # one training curve, with each test set's loss and accuracy
    assert {"train/loss", "test/loss", "test/accuracy_pct", "flex_dark/loss", "flex_dark/accuracy_pct"} <= set(live)
    for record in (first, second):  # each record's epoch is chosen by its own set's loss
        own = live[f"{record['test_name']}/loss"].loss.tolist()
        assert record["chosen_epoch"] == 1 + own.index(min(own))
    assert json.loads(outputs["flex_dark"].read_text())["n_test"] == 4
    for record, path in zip((first, second), outputs.values()):  # each test image's prediction, beside its metrics
        predictions = pd.read_csv(scoring.predictions_path(path), dtype={"md5hash": str})
        assert list(predictions.columns) == ["md5hash", "fitzpatrick_scale", "label", "predicted"]
        assert len(predictions) == record["n_test"] and set(predictions.predicted) <= set(record["labels"])
        assert 100 * (predictions.label == predictions.predicted).mean() == pytest.approx(record["accuracy_pct"])
    assert first["scenario"] == small_cfg().scenario  # no split.json: the params' scenario


def test_records_the_scenario_its_split_was_written_for(tmp_path):
    study = write_study(tmp_path)
    (study["split_dir"] / "split.json").write_text(json.dumps({"scenario": 1, "seed": 0}))
    cfg = config.replace(small_cfg(), scenario=2)  # e.g. the ablation's scenario 1 split in a scenario 2 study
    (record,) = classifiers.run(study["split_dir"], study["images_dir"], None, {"test": tmp_path / "m.json"},
                             "resnet18", "real", cfg, seed=0)
    assert record["scenario"] == 1


def test_run_refuses_a_test_image_in_training(tmp_path):
    study = write_study(tmp_path)
    train = pd.read_csv(study["split_dir"] / "train.csv")
    train.head(3).to_csv(study["split_dir"] / "flex_light.csv", index=False)
    with pytest.raises(SkinaugError, match="in training"):
        classifiers.run(study["split_dir"], study["images_dir"], None, {"flex_light": tmp_path / "m.json"},
                     "resnet18", "real", small_cfg(), seed=0)


# --- interruptions -------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _stop_after(epoch: int):
    def on_epoch(done: int) -> None:
        if done == epoch:
            raise _Stop

    return on_epoch


@pytest.mark.parametrize("selection", ["last", "val", "test_reference"])
def test_interrupted_run_resumes_to_the_uninterrupted_metrics(tmp_path, selection):
    """Stopped after epoch 2 of 3, a rerun trains epoch 3 only and writes the very same metrics:
    the learned weights, Adam's moments, the sampler's and the dropout's random states (and the
    rule's best epoch so far, or each epoch's test predictions) all come back from the checkpoint."""
    study = write_study(tmp_path)
    test = pd.read_csv(study["split_dir"] / "test.csv")
    test.head(4).to_csv(study["split_dir"] / "flex_dark.csv", index=False)  # two test sets, as the ablation has
    cfg = small_cfg(selection=selection, epochs=3, val_fraction=0.25)
    args = (study["split_dir"], study["images_dir"], study["syn_dir"])

    def outputs(name):
        return {"test": tmp_path / name / "m_test.json", "flex_dark": tmp_path / name / "m_flex_dark.json"}

    whole = classifiers.run(*args, outputs("whole"), "resnet18", "real_syn", cfg, seed=0, live_dir=tmp_path / "whole_live")
    with pytest.raises(_Stop):
        classifiers.run(*args, outputs("resumed"), "resnet18", "real_syn", cfg, seed=0, on_epoch=_stop_after(2),
                     live_dir=tmp_path / "resumed_live")
    work = tmp_path / "resumed" / ".m_test.json.partial"
    assert (work / "checkpoint.pt").is_file()
    assert not any(path.exists() for path in outputs("resumed").values())
    epochs = []
    resumed = classifiers.run(*args, outputs("resumed"), "resnet18", "real_syn", cfg, seed=0, on_epoch=epochs.append,
                           live_dir=tmp_path / "resumed_live")
    assert epochs == [3]
    assert resumed == whole
    assert live_bytes(tmp_path / "resumed_live") == live_bytes(tmp_path / "whole_live")  # the curve too
    for name, path in outputs("resumed").items():
        assert path.read_text() == outputs("whole")[name].read_text()
        predictions = scoring.predictions_path(path)
        assert predictions.read_text() == scoring.predictions_path(outputs("whole")[name]).read_text()
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        "m_flex_dark.json", "m_flex_dark.predictions.csv", "m_test.json", "m_test.predictions.csv"]


def test_a_curve_row_logged_after_the_checkpoint_is_not_written_twice(tmp_path):
    """Killed after the last epoch's row reached DVCLive but before the metrics were written, a
    rerun resumes from epoch 2's checkpoint: its curve has each epoch once, as an uninterrupted run's."""
    study = write_study(tmp_path)
    args = (study["split_dir"], study["images_dir"], None)
    cfg = small_cfg(epochs=3)
    classifiers.run(*args, {"test": tmp_path / "whole.json"}, "resnet18", "real", cfg, seed=0, live_dir=tmp_path / "a")
    with pytest.raises(_Stop):
        classifiers.run(*args, {"test": tmp_path / "m.json"}, "resnet18", "real", cfg, seed=0,
                     on_epoch=_stop_after(3), live_dir=tmp_path / "b")
    assert read_live(tmp_path / "b")["train/loss"].step.tolist() == [1, 2, 3]  # the killed run's last row
    epochs = []
    classifiers.run(*args, {"test": tmp_path / "m.json"}, "resnet18", "real", cfg, seed=0, on_epoch=epochs.append,
                 live_dir=tmp_path / "b")
    assert epochs == [3]
    assert read_live(tmp_path / "b")["train/loss"].step.tolist() == [1, 2, 3]
    assert live_bytes(tmp_path / "b") == live_bytes(tmp_path / "a")


def test_checkpoints_are_saved_at_most_every_checkpoint_every_s(tmp_path, monkeypatch):
    """With no save due yet, a run stopped after epoch 2 of 3 leaves no checkpoint; the rerun trains
    all three epochs and writes what an uninterrupted run writes."""
    monkeypatch.setattr(classifiers, "CHECKPOINT_EVERY_S", math.inf)
    study = write_study(tmp_path)
    args = (study["split_dir"], study["images_dir"], None)
    cfg = small_cfg(epochs=3)
    whole = classifiers.run(*args, {"test": tmp_path / "whole.json"}, "resnet18", "real", cfg, seed=0)
    with pytest.raises(_Stop):
        classifiers.run(*args, {"test": tmp_path / "m.json"}, "resnet18", "real", cfg, seed=0,
                        on_epoch=_stop_after(2))
    assert not (tmp_path / ".m.json.partial" / "checkpoint.pt").exists()
    epochs = []
    assert classifiers.run(*args, {"test": tmp_path / "m.json"}, "resnet18", "real", cfg, seed=0,
                           on_epoch=epochs.append) == whole
    assert epochs == [1, 2, 3]


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    study = write_study(tmp_path)
    out = {"test": tmp_path / "m.json"}
    with pytest.raises(_Stop):
        classifiers.run(study["split_dir"], study["images_dir"], None, out, "resnet18", "real", small_cfg(epochs=3),
                     seed=0, on_epoch=_stop_after(2))
    epochs = []
    classifiers.run(study["split_dir"], study["images_dir"], None, out, "resnet18", "real", small_cfg(epochs=3, lr=1e-2),
                 seed=0, on_epoch=epochs.append)
    assert epochs == [1, 2, 3]
    assert not (tmp_path / ".m.json.partial").exists()


@pytest.mark.slow
def test_two_runs_on_one_output_take_turns_and_write_what_one_writes(tmp_path):
    """Two `skinaug classify` processes on the same metrics file (two `dvc exp` workers, say): the
    second waits for the first's lock, then trains again from scratch (the first left no
    checkpoint); the file is a single run's, whole, and nothing else is left beside it."""
    study = write_study(tmp_path)
    cfg = small_cfg(epochs=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    out = tmp_path / "metrics" / "m.json"
    (single,) = classifiers.run(study["split_dir"], study["images_dir"], study["syn_dir"], {"test": tmp_path / "one.json"},
                             "resnet18", "real_syn", cfg, seed=0)
    cmd = [str(Path(sys.executable).parent / "skinaug"), "--params", str(params), "classify", str(study["split_dir"]),
           str(study["images_dir"]), str(out), "--syn-dir", str(study["syn_dir"]), "--arch", "resnet18",
           "--train-type", "real_syn", "--seed", "0"]
    # Same thread count as the run above: CPU kernels sum in another order with other counts.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "TORCH_HOME": str(tmp_path / "torch")}
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    runs = start_two_waiting(cmd, env, out, logs)
    for run, log in zip(runs, logs):
        assert run.wait(timeout=300) == 0, log.read_text()
    assert json.loads(out.read_text()) == single
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.predictions.csv"]
