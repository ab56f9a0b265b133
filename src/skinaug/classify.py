"""Classifiers on real, synthetic or real+synthetic images, scored on a test split (SPEC §5).

One call trains one classifier and writes its test metrics as JSON:

    skinaug classify data/splits/scenario1/seed0 data/images metrics/scenario1/seed0/vgg16_real_syn.json \
        --syn-dir data/syn/scenario1/seed0 --arch vgg16 --train-type real_syn --seed 0

The reference recipe: a torchvision backbone (frozen) with a small head, log-softmax + NLL,
Adam, StepLR(epochs // 3, 0.1), a class-balanced WeightedRandomSampler and the reference
augmentations. Every image is decoded once into a uint8 tensor cache (on the GPU when there
is one) and augmented there in batches, so epochs are not bound by JPEG decoding. Expect
roughly the paper's accuracies in the paper profile (scenario 1, VGG-16, real+syn: 77.98 %)
and seconds per classifier in the demo profile.

Model selection (classify.selection): "last" keeps the final epoch; "val" the epoch with the
lowest loss on a label-stratified share of the real training images held out (with their
synthetic offspring) from training; "test_reference" the reference code's rule, the lowest
TEST loss after epoch 10. That rule leaks the test set: its results say so wherever they go.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from tqdm import tqdm

from skinaug import SkinaugError, atomic, data, diffusion, splits
from skinaug.config import ARCHS, SELECTIONS, Config

TRAIN_TYPES = ("real", "syn", "real_syn")
SELECTION_LABELS = {
    "last": "last epoch",
    "val": "lowest validation loss (real training images held out, stratified by label)",
    "test_reference": "REFERENCE RULE: lowest TEST loss after epoch 10 (leaks the test set; not an honest estimate)",
}
REFERENCE_AFTER_EPOCH = 10  # the reference keeps the best test-loss epoch only after this one
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHTS = {"vgg16": "VGG16_Weights", "resnet18": "ResNet18_Weights", "vit_b_16": "ViT_B_16_Weights"}
assert set(_WEIGHTS) == set(ARCHS) and set(SELECTION_LABELS) == set(SELECTIONS), "config.py names the allowed values"


# --- the network ---------------------------------------------------------------------------

def build_classifier(arch: str, num_classes: int, pretrained: bool, freeze_backbone: bool,
                     image_size: int = 224) -> nn.Module:
    """A torchvision backbone with the reference head; its forward returns log-probabilities.

    image_size only matters for vit_b_16 without pretrained weights: ImageNet ViT takes only
    config.VIT_PRETRAINED_SIZE, which config checks against classify.crop_size on load.
    """
    if arch not in ARCHS:
        raise SkinaugError(f"unknown classifier {arch!r}; choose one of {', '.join(ARCHS)}")
    kwargs = {"image_size": image_size} if arch == "vit_b_16" and not pretrained else {}
    weights = getattr(torchvision.models, _WEIGHTS[arch]).IMAGENET1K_V1 if pretrained else None
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated file a RuntimeError
        if weights is None:
            raise
        raise SkinaugError(_weights_message(arch, weights.url, e)) from e
    if freeze_backbone:
        model.requires_grad_(False)  # the head below is new, so it alone trains
    if arch == "vgg16":
        model.classifier[6] = reference_head(model.classifier[6].in_features, num_classes)
    elif arch == "resnet18":
        model.fc = reference_head(model.fc.in_features, num_classes)
    else:
        model.heads.head = reference_head(model.heads.head.in_features, num_classes)
    return model


def reference_head(in_features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(), nn.Dropout(0.4),
                         nn.Linear(256, num_classes), nn.LogSoftmax(dim=1))


def _weights_message(arch: str, url: str, error: Exception) -> str:
    filename = url.rsplit("/", 1)[-1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"ImageNet weights for {arch} could not be loaded ({type(error).__name__}: {error}). "
            f"Offline? Download {url} on a connected machine and place it as {cache / filename} "
            f"(torch.hub.get_dir()/checkpoints; TORCH_HOME moves it), or set classify.pretrained: false")


# --- data ----------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images decoded once (uint8, N x 3 x S x S) with their class ids and metadata rows."""
    images: torch.Tensor
    targets: torch.Tensor
    table: pd.DataFrame  # path, label, md5hash (of the real image or the synthetic one's source), fitzpatrick_scale, kind


def read_split(split_dir: Path, name: str) -> pd.DataFrame:
    path = Path(split_dir) / f"{name}.csv"
    if not path.exists():
        raise SkinaugError(f"{path} not found: run the splits stage first (test sets: test, flex_light, flex_dark)")
    return data.read_table(path)


def read_manifest(syn_dir: Path | None, train_type: str) -> pd.DataFrame | None:
    if train_type == "real":
        return None
    if syn_dir is None or not (Path(syn_dir) / "manifest.csv").exists():
        raise SkinaugError(f"train type {train_type} needs --syn-dir with a manifest.csv (the generate stage's output)")
    return data.read_table(Path(syn_dir) / "manifest.csv")


def real_items(rows: pd.DataFrame, images_dir: Path) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(Path(images_dir) / f"{h}.jpg") for h in rows.md5hash],
                         "label": rows.label.to_numpy(), "md5hash": rows.md5hash.to_numpy(),
                         "fitzpatrick_scale": rows.fitzpatrick_scale.to_numpy(), "kind": "real"})


def syn_items(manifest: pd.DataFrame, syn_dir: Path) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(Path(syn_dir) / f) for f in manifest.file],
                         "label": manifest.label.to_numpy(), "md5hash": manifest.source_md5hash.to_numpy(),
                         "fitzpatrick_scale": manifest.fitzpatrick_scale.to_numpy(), "kind": "syn"})


def stratified_holdout(rows: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of rows held out: round(fraction * n) per label, at least one of each label
    that has two or more rows, never a label's last row."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(rows), dtype=bool)
    for _, positions in sorted(rows.groupby("label").indices.items()):
        n = len(positions)
        k = min(max(round(fraction * n), 1), n - 1) if n > 1 else 0
        held[rng.choice(positions, size=k, replace=False)] = True
    return held


def training_items(train: pd.DataFrame, manifest: pd.DataFrame | None, train_type: str, images_dir: Path,
                   syn_dir: Path | None, selection: str, val_fraction: float, seed: int
                   ) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The images a classifier trains on and, for selection "val", the real images it is
    validated on. A held-out image's synthetic offspring are dropped from training too."""
    if train_type not in TRAIN_TYPES:
        raise SkinaugError(f"unknown train type {train_type!r}; choose one of {', '.join(TRAIN_TYPES)}")
    val = None
    if selection == "val":
        held = stratified_holdout(train, val_fraction, seed)
        val, train = real_items(train[held], images_dir), train[~held]
        if manifest is not None:
            manifest = manifest[~manifest.source_md5hash.isin(val.md5hash)]
    parts = []
    if train_type in ("real", "real_syn"):
        parts.append(real_items(train, images_dir))
    if train_type in ("syn", "real_syn"):
        parts.append(syn_items(manifest, syn_dir))
    items = pd.concat(parts, ignore_index=True)
    if items.empty:
        raise SkinaugError(f"no training images for train type {train_type}")
    return items, val


def decode_images(paths: list[str], size: int) -> torch.Tensor:
    """Decode each image once: shorter side resized to `size`, centre square kept (uint8, N x 3 x S x S).

    Equals the reference test transform's Resize(size) before its centre crop.
    """
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SkinaugError(f"{len(missing)} image(s) missing, e.g. {missing[0]}")

    def load(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers `size`
            im = TF.center_crop(TF.resize(im.convert("RGB"), [size]), [size, size])
            return TF.pil_to_tensor(im)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        tensors = list(tqdm(pool.map(load, paths), total=len(paths), desc="decode", leave=False))
    return torch.stack(tensors)


def load_set(items: pd.DataFrame, labels: list[str], size: int, device: torch.device) -> ImageSet:
    unknown = sorted(set(items.label) - set(labels))
    if unknown:
        raise SkinaugError(f"labels not in subset.labels: {', '.join(unknown)}")
    targets = torch.tensor([labels.index(x) for x in items.label], device=device)
    return ImageSet(decode_images(list(items.path), size).to(device), targets, items.reset_index(drop=True))


# --- augmentation on tensors ---------------------------------------------------------------

def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_view(images: torch.Tensor, crop_size: int) -> torch.Tensor:
    """The reference test transform on cached images: CenterCrop(crop_size), normalisation."""
    return normalise(TF.center_crop(images, [crop_size, crop_size]).float() / 255)


def augment(images: torch.Tensor, crop_size: int, generator: torch.Generator) -> torch.Tensor:
    """The reference train transform on a uint8 batch, with random parameters drawn per image.

    RandomResizedCrop(S, scale=(0.8, 1)) -> RandomRotation(15) -> ColorJitter() -> horizontal
    flip -> CenterCrop(crop_size) -> normalisation. ColorJitter() with its default arguments is
    the identity. The geometric steps compose into one affine map per image, so the whole batch
    is resampled in one grid_sample call (torchvision's batched transforms would share one set of
    parameters across the batch; per-image calls are too slow for 135 classifiers).
    """
    n, size = images.shape[0], images.shape[-1]
    boxes = _random_resized_boxes(n, size, generator)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15)
    flip = torch.rand(n, generator=generator) < 0.5
    return normalise(warp(images, crop_size, boxes, angle, flip) / 255)


def warp(images: torch.Tensor, crop_size: int, boxes: torch.Tensor, angle: torch.Tensor,
         flip: torch.Tensor) -> torch.Tensor:
    """resized_crop(box) -> rotate(angle, radians) -> hflip where flip -> center_crop, as one resampling.

    boxes: (n, 4) x0, y0, w, h in pixels of the (square) images. Returns float, same value range.
    """
    n, size = images.shape[0], images.shape[-1]
    # Output pixel (normalised, align_corners=False) -> point q of the rotated, resized crop.
    c = crop_size / size
    sx = torch.where(flip, -c, c)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * c
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * c
    q = F.affine_grid(theta.to(images.device), [n, 3, crop_size, crop_size], align_corners=False)
    inside = (q.abs() <= 1).all(dim=-1)  # outside the crop: the rotation's black fill
    # q -> source point: the crop box's centre plus q times its half extent.
    x0, y0, w, h = (boxes / size).to(images.device).unbind(1)
    centre = torch.stack([2 * x0 + w - 1, 2 * y0 + h - 1], dim=1)[:, None, None, :]
    extent = torch.stack([w, h], dim=1)[:, None, None, :]
    out = F.grid_sample(images.float(), q * extent + centre, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out * inside[:, None]


def _random_resized_boxes(n: int, size: int, generator: torch.Generator, scale=(0.8, 1.0),
                          ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n square images at once: (n, 4) x0, y0, w, h."""
    area = size * size * torch.empty(n, tries).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w <= size) & (h <= size)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], float(size))  # none fits: the whole image
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], float(size))
    x0 = torch.floor(torch.rand(n, generator=generator) * (size - w + 1))
    y0 = torch.floor(torch.rand(n, generator=generator) * (size - h + 1))
    return torch.stack([x0, y0, w, h], dim=1)


def balanced_order(targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch of indices from a WeightedRandomSampler by inverse class frequency (the reference's)."""
    counts = torch.bincount(targets.cpu())
    weights = 1.0 / counts[targets.cpu()].double()
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(targets), replacement=True, generator=generator)
    return torch.tensor(list(sampler))


# --- the epoch loop ------------------------------------------------------------------------

def train_one_epoch(model: nn.Module, data: ImageSet, batch_size: int, optimizer: torch.optim.Optimizer,
                    crop_size: int, generator: torch.Generator) -> tuple[float, float]:
    """One pass over a class-balanced draw of the training set; returns (mean loss, accuracy %)."""
    model.train()
    order = balanced_order(data.targets, generator).to(data.images.device)
    total_loss, correct, seen = 0.0, 0, 0
    for idx in order.split(batch_size):
        if len(idx) == 1:  # BatchNorm cannot train on a single image; drop a lone last one
            continue
        log_probs = model(augment(data.images[idx], crop_size, generator))
        loss = F.nll_loss(log_probs, data.targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        correct += (log_probs.argmax(1) == data.targets[idx]).sum().item()
        seen += len(idx)
    return total_loss / seen, 100 * correct / seen


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int, crop_size: int) -> tuple[float, torch.Tensor]:
    """Mean NLL loss and predicted class ids (on the CPU) under the reference test transform."""
    model.eval()
    total_loss, preds = 0.0, []
    for idx in torch.arange(len(data.targets), device=data.images.device).split(batch_size):
        log_probs = model(eval_view(data.images[idx], crop_size))
        total_loss += F.nll_loss(log_probs, data.targets[idx], reduction="sum").item()
        preds.append(log_probs.argmax(1).cpu())
    return total_loss / len(data.targets), torch.cat(preds)


def fit(model: nn.Module, train: ImageSet, val: ImageSet | None, tests: list[ImageSet], cfg: Config, seed: int,
        desc: str = "train") -> tuple[list[dict], int, list[torch.Tensor]]:
    """Train for classify.epochs; return the curve, the chosen epoch and its predictions on each test set.

    The test_reference rule chooses by the loss on the first test set.
    """
    ccfg = cfg.classify
    generator = torch.Generator().manual_seed(seed)  # sampler order and augmentation parameters
    # fused: one kernel per step (3.5x faster than the default on a CPU); same update rule
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ccfg.lr, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, ccfg.epochs // 3), gamma=0.1)
    curve, test_preds = [], {}
    chosen, best_val_loss, best_state = ccfg.epochs, math.inf, None
    bar = tqdm(range(1, ccfg.epochs + 1), desc=desc, unit="epoch")
    for epoch in bar:
        loss, accuracy = train_one_epoch(model, train, ccfg.batch_size, optimizer, ccfg.crop_size, generator)
        scheduler.step()
        row = {"epoch": epoch, "loss": loss, "accuracy_pct": accuracy}
        if val is not None:
            row["val_loss"], preds = evaluate(model, val, ccfg.batch_size, ccfg.crop_size)
            row["val_accuracy_pct"] = 100 * (preds == val.targets.cpu()).float().mean().item()
            if row["val_loss"] < best_val_loss:
                chosen, best_val_loss = epoch, row["val_loss"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ccfg.selection == "test_reference":
            results = [evaluate(model, test, ccfg.batch_size, ccfg.crop_size) for test in tests]
            row["test_loss"], test_preds[epoch] = results[0][0], [preds for _, preds in results]
        curve.append(row)
        bar.set_postfix({k: round(v, 3) for k, v in row.items() if k != "epoch"})
    if ccfg.selection == "test_reference":
        eligible = [r for r in curve if r["epoch"] > REFERENCE_AFTER_EPOCH] or curve  # short runs: every epoch
        chosen = min(eligible, key=lambda r: r["test_loss"])["epoch"]
        return curve, chosen, test_preds[chosen]
    if best_state is not None:
        model.load_state_dict(best_state)
    return curve, chosen, [evaluate(model, test, ccfg.batch_size, ccfg.crop_size)[1] for test in tests]


# --- metrics -------------------------------------------------------------------------------

def score(y_true, y_pred, labels: list[str], fitzpatrick_scale) -> dict:
    """Test metrics in percent; precision, recall and F1 are macro averages over all labels."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    correct = y_true == y_pred
    fst = np.asarray(fitzpatrick_scale)
    return {
        "accuracy_pct": 100 * float(correct.mean()),
        "precision_pct": 100 * float(p.mean()),
        "recall_pct": 100 * float(r.mean()),
        "f1_pct": 100 * float(f.mean()),
        "per_label": {lab: {"precision_pct": 100 * float(p[i]), "recall_pct": 100 * float(r[i]),
                            "f1_pct": 100 * float(f[i]), "support": int(support[i])} for i, lab in enumerate(labels)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),  # rows true, columns predicted
        "accuracy_pct_by_fitzpatrick_scale": {str(s): 100 * float(correct[fst == s].mean()) for s in sorted(set(fst))},
        "n_test_by_fitzpatrick_scale": {str(s): int((fst == s).sum()) for s in sorted(set(fst))},
        "n_test": len(y_true),
    }


# --- wiring --------------------------------------------------------------------------------

def run(split_dir: Path, images_dir: Path, syn_dir: Path | None, outputs: dict[str, Path], arch: str,
        train_type: str, cfg: Config, seed: int) -> list[dict]:
    """Train one classifier on split_dir/train.csv (+ synthetic images), test it on each
    {test_name}.csv of `outputs` (test name -> metrics JSON path), write and return the metrics."""
    start, ccfg, labels = time.time(), cfg.classify, list(cfg.subset.labels)
    train_rows = read_split(split_dir, "train")
    tests_rows = {name: read_split(split_dir, name) for name in outputs}
    manifest = read_manifest(syn_dir, train_type)
    train_items, val_items = training_items(train_rows, manifest, train_type, images_dir, syn_dir,
                                            ccfg.selection, ccfg.val_fraction, seed)
    leaked = set(train_items.md5hash) & set().union(*(set(rows.md5hash) for rows in tests_rows.values()))
    if leaked:
        raise SkinaugError(f"{len(leaked)} test image(s) (or their synthetic offspring) are in training, e.g. {min(leaked)}")
    device = diffusion.pick_device(cfg.model.device)
    torch.manual_seed(seed)  # head initialisation and dropout
    model = build_classifier(arch, len(labels), ccfg.pretrained, ccfg.freeze_backbone, ccfg.crop_size).to(device)
    train = load_set(train_items, labels, ccfg.image_size, device)
    val = None if val_items is None else load_set(val_items, labels, ccfg.image_size, device)
    tests = [load_set(real_items(rows, images_dir), labels, ccfg.image_size, device) for rows in tests_rows.values()]
    curve, chosen, preds = fit(model, train, val, tests, cfg, seed, desc=f"{arch} {train_type} seed {seed}")
    kinds = train.table.kind.value_counts()
    scenario = splits.split_scenario(split_dir, cfg.scenario)
    records = []
    for (test_name, out_json), test, test_preds in zip(outputs.items(), tests, preds):
        record = {
            "scenario": scenario, "seed": seed, "arch": arch, "train_type": train_type, "test_name": test_name,
            "selection": {"rule": ccfg.selection, "label": SELECTION_LABELS[ccfg.selection],
                          "honest": ccfg.selection != "test_reference"},
            "chosen_epoch": chosen, "epochs": ccfg.epochs, "pretrained": ccfg.pretrained,
            "freeze_backbone": ccfg.freeze_backbone, "profile": cfg.profile, "labels": labels,
            "n_train": {"real": int(kinds.get("real", 0)), "syn": int(kinds.get("syn", 0)),
                        "total": len(train.targets)},
            "n_val": 0 if val is None else len(val.targets),
            **score(test.targets.cpu(), test_preds, labels, test.table.fitzpatrick_scale),
            "curve": curve, "seconds": round(time.time() - start, 1), "device": str(device),
        }
        atomic.write_json(out_json, record)
        records.append(record)
    return records
