"""Classifiers on real, synthetic or real+synthetic images, scored on a test split (SPEC §5).

One call trains one classifier and writes its test metrics as JSON, and beside it each test
image's predicted label ({stem}.predictions.csv, for the report's bootstrap intervals):

    skinaug classify data/splits/scenario1/seed0 data/images metrics/scenario1/seed0/vgg16_real_syn.json \
        --syn-dir data/synthetic/scenario1/seed0 --keep data/selected/scenario1/seed0/kept.csv \
        --arch vgg16 --train-type real_syn --seed 0 \
        --live-dir dvclive/scenario1/seed0/vgg16_real_syn
    skinaug classify data/splits/ablation/seed0 data/images metrics/ablation/seed0/img2img_ti_lora_{test}.json \
        --syn-dir data/synthetic/ablation/seed0/img2img_ti_lora --arch vgg16 --train-type syn \
        --test flex_light --test flex_dark --epochs 0 --seed 0
    skinaug reference data/splits/scenario1/seed0 data/images models/scenario1/seed0/reference.pt --seed 0

The reference recipe: a torchvision backbone (frozen) with a small head, log-softmax + NLL,
Adam, StepLR(epochs // 3, 0.1), a class-balanced WeightedRandomSampler and the reference
augmentations. Every image is decoded once into a uint8 tensor cache (on the GPU when there
is one) and augmented there in batches, so epochs are not bound by JPEG decoding. Expect
roughly the paper's accuracies in the paper profile (scenario 1, VGG-16, real+syn: 77.98 %)
and seconds per classifier in the demo profile.

Training images are cached whole, aspect ratio kept, and RandomResizedCrop draws its box over
the whole photo as torchvision does, so a crop can reach the photo's edges; test and validation
images are cached as Resize + CenterCrop, which is the reference test transform.

classify.lr_step "start" steps StepLR before each epoch's training, as the reference loop does,
so each decay comes one epoch early (30 epochs: 1e-3 for epochs 1-9, 1e-4 for 10-19, 1e-5 for
20-29, 1e-6 for 30); "end" steps it after, as StepLR is meant to be used.

Model selection (classify.selection): "last" keeps the final epoch; "val" the epoch with the
lowest loss on a label-stratified share of the real training images held out (with their
synthetic offspring) from training; "test_reference" the reference code's rule, for each test
set the epoch of lowest loss on that set after epoch 10 (the ablation tests one classifier on
flex_light and flex_dark: each gets its own epoch). That rule leaks the test set: its results
say so wherever they go.

Killed mid-training, a classifier continues from its last finished epoch (resume.Work, a hidden
folder beside the metrics file) and writes exactly the metrics an uninterrupted run writes; the
metrics hold no timing (the command prints it), so they are a pure function of the inputs.
The training curve goes to a DVCLive folder (--live-dir; skinaug.live), one row per epoch, and
a resumed run replays its checkpoint's rows there: it too equals an uninterrupted run's.

Over 300 lines: building, feeding, training and resuming a classifier share the ImageSet and the
checkpoint; the architectures are rows of classify/archs.py, metrics classify/scoring.py's.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from tqdm import tqdm

from skinaug import SkinaugError, atomic, hashing, live, resume
from skinaug.classify.archs import ARCHITECTURES
from skinaug.classify.scoring import predictions_path, score
from skinaug.config import ARCHS, SELECTION_LABELS, TRAIN_TYPES, Config
from skinaug.data import fitzpatrick, splits
from skinaug.diffusion import sd21

# A classifier's checkpoint (ResNet-18 with Adam's moments: 134 MB) took 0.3 s to write on 2 CPU cores, about
# a third of each of a demo ablation classifier's 32 one-second epochs: fit saves one at most this often.
CHECKPOINT_EVERY_S = 30.0
REFERENCE_AFTER_EPOCH = 10  # the reference keeps the best test-loss epoch only after this one
CROP_SCALE = (0.8, 1.0)  # the reference's RandomResizedCrop(scale=...): share of the image's area kept
CROP_RATIO = (3 / 4, 4 / 3)  # its default ratio range (width / height of the box)
ROTATION_DEGREES = 15  # the reference's RandomRotation(15)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- the network ---------------------------------------------------------------------------

def build_classifier(arch: str, num_classes: int, pretrained: bool, freeze_backbone: bool,
                     image_size: int = 224, weights: Path | None = None) -> nn.Module:
    """A torchvision backbone with the reference head; its forward returns log-probabilities.

    pretrained: torchvision's ImageNet weights, or with `weights` (a backbone stage file,
    backbone.source: world) that file's. image_size only matters for vit_b_16 without ImageNet
    weights: ImageNet ViT takes only config.VIT_PRETRAINED_SIZE, which config checks on load.
    """
    if arch not in ARCHS:
        raise SkinaugError(f"unknown classifier {arch!r}; choose one of {', '.join(ARCHS)}")
    row = ARCHITECTURES[arch]
    imagenet = pretrained and weights is None
    kwargs = {"image_size": image_size} if row.sized and not imagenet else {}
    imagenet_weights = getattr(torchvision.models, row.weights).IMAGENET1K_V1 if imagenet else None
    try:
        model = torchvision.models.get_model(arch, weights=imagenet_weights, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated file a RuntimeError
        if imagenet_weights is None:
            raise
        raise SkinaugError(_weights_message(arch, imagenet_weights.url, e)) from e
    if pretrained and weights is not None:
        load_backbone(model, arch, weights)
    if freeze_backbone:
        model.requires_grad_(False)  # the head below is new, so it alone trains
    parent, _, name = row.head.rpartition(".")
    setattr(model.get_submodule(parent), name, reference_head(model.get_submodule(row.head).in_features, num_classes))
    for module in model.modules():
        if CentreTapConv2d.applies(module):
            module.__class__ = CentreTapConv2d  # same parameters and state_dict: still the torchvision model
    return model


class CentreTapConv2d(nn.Conv2d):
    """A 3 x 3, stride 1, padding 1 convolution that on a 1 x 1 feature map uses only its kernel's
    centre tap: the other eight see nothing but padding zeros, so the output and every gradient are
    the same (to float rounding; the other taps' gradients are zero either way).

    Why: ResNet-18's last stage runs on 1 x 1 maps at the demo's 32 px crops, and on a CPU a forward
    and backward pass through oneDNN's 3 x 3 kernel there took 136 ms against 6 ms for the 1 x 1
    kernel it amounts to (2 threads, batch 64, 512 channels); a whole training step took 733 ms against
    348 ms (benchmarks/README.md). At the paper's 224 px no map is 1 x 1 and nothing changes.
    """

    @staticmethod
    def applies(module: nn.Module) -> bool:
        return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
                and module.padding == (1, 1) and module.dilation == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            return super().forward(x)
        return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias, groups=self.groups)


def load_backbone(model: nn.Module, arch: str, path: Path) -> None:
    """Load a backbone file (every weight but the head's) into a freshly built torchvision model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise SkinaugError(f"backbone weights {path} do not load into {arch} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]}); re-run the backbone stage (`dvc repro backbone`)") from e
    head = ARCHITECTURES[arch].head + "."
    if unexpected or any(not k.startswith(head) for k in missing):
        raise SkinaugError(f"backbone weights {path} are not a {arch} backbone ({len(missing)} weights missing, "
                           f"{len(unexpected)} unexpected); re-run the backbone stage (`dvc repro backbone`)")


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
    """Images decoded once (uint8, N x 3 x side x side) with their class ids and metadata rows."""
    images: torch.Tensor
    targets: torch.Tensor
    table: pd.DataFrame  # path, label, md5hash (of the real image or the synthetic one's source), fitzpatrick_scale, kind
    # Training caches (decode_frames): N x 4 original width, height and stored width, height of each
    # image, which fills the top-left of its canvas. None: each image fills its square canvas.
    frames: torch.Tensor | None = None


def read_split(split_dir: Path, name: str) -> pd.DataFrame:
    path = Path(split_dir) / f"{name}.csv"
    if not path.exists():
        raise SkinaugError(f"{path} not found: run the splits stage first (test sets: test, flex_light, flex_dark)")
    return fitzpatrick.read_table(path)


def read_manifest(syn_dir: Path | None, train_type: str, keep: Path | None = None) -> pd.DataFrame | None:
    """The generate stage's manifest; with `keep` (the select stage's kept.csv) only the rows it keeps,
    in the manifest's order, so keeping every row changes nothing."""
    if train_type == "real":
        return None
    if syn_dir is None or not (Path(syn_dir) / "manifest.csv").exists():
        raise SkinaugError(f"train type {train_type} needs --syn-dir with a manifest.csv (the generate stage's output)")
    manifest = fitzpatrick.read_table(Path(syn_dir) / "manifest.csv")
    if keep is None:
        return manifest
    kept = fitzpatrick.read_table(keep)
    unknown = sorted(set(kept.file) - set(manifest.file))
    if unknown:
        raise SkinaugError(f"{keep} keeps {len(unknown)} image(s) not in {Path(syn_dir) / 'manifest.csv'}, "
                           f"e.g. {unknown[0]}: re-run the select stage on this generate output")
    return manifest[manifest.file.isin(set(kept.file))]


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
    def load(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that still covers `size`
            im = TF.center_crop(TF.resize(im.convert("RGB"), [size]), [size, size])
            return TF.pil_to_tensor(im)

    _check_exist(paths)
    return torch.stack(_in_threads(load, paths, "decode"))


def decode_frames(paths: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode whole images once for training: (uint8 N x 3 x C x C canvases, frames N x 4).

    Each image keeps its aspect ratio (stored_size) in the top-left of a canvas whose side C is
    the largest stored side; its edge pixels repeat into the rest of the canvas, so sampling at
    the image's border never blends in black. frames: original width, height (RandomResizedCrop
    draws its box in these pixels, as the reference draws it on the photo), stored width, height.
    """
    def header(path: str) -> tuple[int, int]:
        with Image.open(path) as im:
            return im.size

    def load(i: int) -> None:
        w, h = stored[i]
        with Image.open(paths[i]) as im:
            im.draft("RGB", (w, h))
            x = TF.pil_to_tensor(TF.resize(im.convert("RGB"), [h, w]))
        canvas[i] = x[:, torch.arange(side).clamp(max=h - 1)][:, :, torch.arange(side).clamp(max=w - 1)]

    _check_exist(paths)
    originals = _in_threads(header, paths, "sizes")
    stored = [stored_size(w, h, size) for w, h in originals]
    side = max(max(wh) for wh in stored)
    canvas = torch.empty(len(paths), 3, side, side, dtype=torch.uint8)  # filled in place: no second copy
    _in_threads(load, range(len(paths)), "decode")
    return canvas, torch.tensor([[*o, *s] for o, s in zip(originals, stored)])


def stored_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of a training image in the cache: shorter side `size`, longer side as
    Resize(size) makes it but at most size / 0.8.

    A RandomResizedCrop box spans >= 80 % of each side (CROP_SCALE) and becomes `size` pixels,
    so a longer side would add pixels no crop uses. The exception is torchvision's fallback, the
    4:3 centre of a photo wider than 5:3: beyond about 2:1 it is upsampled more than any box's
    shorter side (a bound on the cache's memory: one odd panorama would widen every canvas)."""
    short, long = sorted((width, height))
    long = min(int(size * long / short), math.ceil(size / CROP_SCALE[0]))
    return (long, size) if width >= height else (size, long)


def _check_exist(paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise SkinaugError(f"{len(missing)} image(s) missing, e.g. {missing[0]}")


def _in_threads(function, items, desc: str) -> list:
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        return list(tqdm(pool.map(function, items), total=len(items), desc=desc, leave=False))


def load_set(items: pd.DataFrame, labels: list[str], size: int, device: torch.device,
             whole: bool = False) -> ImageSet:
    """The images of `items` decoded once: whole (training, decode_frames) or Resize + CenterCrop."""
    unknown = sorted(set(items.label) - set(labels))
    if unknown:
        raise SkinaugError(f"labels not in subset.labels: {', '.join(unknown)}")
    targets = torch.tensor([labels.index(x) for x in items.label], device=device)
    images, frames = decode_frames(list(items.path), size) if whole else (decode_images(list(items.path), size), None)
    return ImageSet(images.to(device), targets, items.reset_index(drop=True), frames)


# --- augmentation on tensors ---------------------------------------------------------------

def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def eval_view(images: torch.Tensor, crop_size: int) -> torch.Tensor:
    """The reference test transform on cached images: CenterCrop(crop_size), normalisation."""
    return normalise(TF.center_crop(images, [crop_size, crop_size]).float() / 255)


def augment(images: torch.Tensor, frames: torch.Tensor, size: int, crop_size: int,
            generator: torch.Generator) -> torch.Tensor:
    """The reference train transform on a uint8 batch, with random parameters drawn per image.

    RandomResizedCrop(size, scale=(0.8, 1)) of the whole image -> RandomRotation(15) ->
    ColorJitter() -> horizontal flip -> CenterCrop(crop_size) -> normalisation. ColorJitter()
    with its default arguments is the identity. The geometric steps compose into one affine map
    per image, so the whole batch is resampled in one grid_sample call (torchvision's batched
    transforms would share one set of parameters across the batch; per-image calls are too slow
    for 135 classifiers). frames: as ImageSet.frames, for these images.
    """
    n = images.shape[0]
    boxes = random_resized_boxes(frames[:, :2], generator)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ROTATION_DEGREES)
    flip = torch.rand(n, generator=generator) < 0.5
    return normalise(warp(images, frames, boxes, angle, flip, size, crop_size) / 255)


def whole_canvas(images: torch.Tensor) -> torch.Tensor:
    """Frames of images that each fill their square canvas (a cache without frames)."""
    return torch.tensor(images.shape[-1]).repeat(images.shape[0], 4)


def warp(images: torch.Tensor, frames: torch.Tensor, boxes: torch.Tensor, angle: torch.Tensor,
         flip: torch.Tensor, size: int, crop_size: int) -> torch.Tensor:
    """resized_crop(box, size x size) -> rotate(angle, radians) -> hflip where flip -> center_crop,
    as one resampling.

    images: canvases as decode_frames makes them, frames as ImageSet.frames; boxes: (n, 4) x0, y0,
    w, h in pixels of each original image. The box is stretched to a square as resized_crop does.
    Returns float, same value range.
    """
    n, side = images.shape[0], images.shape[-1]
    # Output pixel (normalised, align_corners=False) -> point q of the rotated, resized crop.
    c = crop_size / size
    sx = torch.where(flip, -c, c)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * c
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * c
    q = F.affine_grid(theta.to(images.device), [n, 3, crop_size, crop_size], align_corners=False)
    inside = (q.abs() <= 1).all(dim=-1)  # outside the crop: the rotation's black fill
    # q -> canvas point: original pixel x lies at 2 * x * (stored width / original width) / side - 1.
    per_pixel = frames[:, 2:].double() / (frames[:, :2].double() * side)
    extent = boxes[:, 2:] * per_pixel
    centre = (2 * boxes[:, :2] + boxes[:, 2:]) * per_pixel - 1
    extent, centre = (t.float().to(images.device)[:, None, None] for t in (extent, centre))
    out = F.grid_sample(images.float(), q * extent + centre, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out * inside[:, None]


def random_resized_boxes(sizes: torch.Tensor, generator: torch.Generator, scale=CROP_SCALE, ratio=CROP_RATIO,
                         tries: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n images of (width, height) `sizes` at once:
    (n, 4) x0, y0, w, h in their pixels.

    Each image takes its first of `tries` draws that fits (area share and log-uniform aspect
    drawn in float32, sizes rounded as get_params does), placed uniformly; if none fits, the
    centred crop with the image's ratio clamped to `ratio`. No draw fits a photo wider than about
    5:3 (taller than 3:5) with scale >= 0.8, so the reference always crops its 4:3 (3:4) centre.
    """
    n = len(sizes)
    width, height = sizes.double()[:, :1], sizes.double()[:, 1:]
    area = width * height * torch.empty(n, tries).uniform_(*scale, generator=generator).double()
    log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32, as get_params computes it
    aspect = torch.exp(torch.empty(n, tries).uniform_(*log_ratio, generator=generator)).double()
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, found = fits.int().argmax(dim=1, keepdim=True), fits.any(dim=1, keepdim=True)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > max(ratio), (height * max(ratio)).round(), width)
    fallback_h = torch.where(in_ratio < min(ratio), (width / min(ratio)).round(), height)
    w, h = torch.where(found, w.gather(1, first), fallback_w), torch.where(found, h.gather(1, first), fallback_h)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    x0 = torch.where(found, torch.floor(u[:, :1] * (width - w + 1)), torch.floor((width - w) / 2))
    y0 = torch.where(found, torch.floor(u[:, 1:] * (height - h + 1)), torch.floor((height - h) / 2))
    return torch.cat([x0, y0, w, h], dim=1)


def balanced_order(targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch of indices from a WeightedRandomSampler by inverse class frequency (the reference's)."""
    counts = torch.bincount(targets.cpu())
    weights = 1.0 / counts[targets.cpu()].double()
    sampler = torch.utils.data.WeightedRandomSampler(weights, len(targets), replacement=True, generator=generator)
    return torch.tensor(list(sampler))


# --- the epoch loop ------------------------------------------------------------------------

def lr_schedule(lr: float, epochs: int, lr_step: str) -> list[float]:
    """The learning rate of each epoch under StepLR(step_size=epochs // 3, gamma=0.1), its step()
    called at each epoch's start (the reference loop: one epoch early) or end. A list rather than
    a StepLR object, since stepping before optimizer.step() is the order torch warns against."""
    step_size, shift = max(1, epochs // 3), {"start": 1, "end": 0}[lr_step]
    return [lr * 0.1 ** ((epoch + shift) // step_size) for epoch in range(epochs)]


def train_one_epoch(model: nn.Module, data: ImageSet, batch_size: int, optimizer: torch.optim.Optimizer,
                    crop_size: int, generator: torch.Generator, image_size: int | None = None) -> tuple[float, float]:
    """One pass over a class-balanced draw of the training set; returns (mean loss, accuracy %).

    image_size: RandomResizedCrop's output side; None: the side of a cache without frames.
    """
    model.train()
    order = balanced_order(data.targets, generator)  # on the CPU, like the frames it indexes
    frames = whole_canvas(data.images) if data.frames is None else data.frames
    size = image_size or data.images.shape[-1]
    total_loss, correct, seen = 0.0, 0, 0
    for idx in order.split(batch_size):
        if len(idx) == 1:  # BatchNorm cannot train on a single image; drop a lone last one
            continue
        log_probs = model(augment(data.images[idx], frames[idx], size, crop_size, generator))
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


def fit(model: nn.Module, train: ImageSet, val: ImageSet | None, tests: dict[str, ImageSet], cfg: Config,
        seed: int, desc: str = "train", work: resume.Work | None = None, on_epoch=None,
        curve: live.Curve | None = None) -> tuple[list[dict], dict[str, int], dict[str, torch.Tensor]]:
    """Train for classify.epochs; return the curve and, per test set, the chosen epoch and its predictions.

    Curve rows hold val_loss and val_accuracy_pct under the "val" rule, and test_loss_{name} and
    test_accuracy_pct_{name} for each test set under "test_reference", which chooses an epoch for
    each test set by that set's own loss (the honest rules never look at a test set before the end).
    curve: each row goes to DVCLive as it is made (live_values); a resumed run replays the rows
    of its checkpoint first.
    work: after an epoch (never the last) that ends CHECKPOINT_EVERY_S or more after the previous
    save or the start, everything the remaining epochs need (learned weights, optimizer, sampler
    and dropout random states, the selection's bookkeeping) is saved there, and a run given a work
    holding such a checkpoint continues from it exactly as if never stopped: a kill loses at most
    that long, plus the epoch under way.
    on_epoch(epoch) is called after each epoch (and its checkpoint).
    """
    ccfg = cfg.classify
    generator = torch.Generator().manual_seed(seed)  # sampler order and augmentation parameters
    # fused: one kernel per step (3.5x faster than the default on a CPU); same update rule
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=ccfg.lr, fused=True)
    progress = _Progress(chosen=ccfg.epochs)
    if work is not None and work.state is not None:
        progress = _restore(work.state, model, optimizer, generator)
    for row in progress.curve if curve is not None else []:
        curve.log(row["epoch"], live_values(row))
    schedule = list(enumerate(lr_schedule(ccfg.lr, ccfg.epochs, ccfg.lr_step), 1))
    bar = tqdm(schedule[progress.epoch:], desc=desc, unit="epoch", initial=progress.epoch, total=len(schedule))
    saved_at = time.monotonic()
    for epoch, lr in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, accuracy = train_one_epoch(model, train, ccfg.batch_size, optimizer, ccfg.crop_size, generator,
                                         ccfg.image_size)
        row = {"epoch": epoch, "lr": lr, "loss": loss, "accuracy_pct": accuracy}
        if val is not None:
            row["val_loss"], preds = evaluate(model, val, ccfg.batch_size, ccfg.crop_size)
            row["val_accuracy_pct"] = 100 * (preds == val.targets.cpu()).float().mean().item()
            if row["val_loss"] < progress.best_val_loss:
                progress.chosen, progress.best_val_loss, progress.best_state = epoch, row["val_loss"], _learned(model)
        if ccfg.selection == "test_reference":
            for name, test in tests.items():
                row[f"test_loss_{name}"], preds = evaluate(model, test, ccfg.batch_size, ccfg.crop_size)
                row[f"test_accuracy_pct_{name}"] = 100 * (preds == test.targets.cpu()).float().mean().item()
                progress.test_preds.setdefault(name, {})[epoch] = preds
        progress.curve.append(row)
        progress.epoch = epoch
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k != "epoch"})
        due = time.monotonic() - saved_at >= CHECKPOINT_EVERY_S
        if work is not None and epoch < len(schedule) and due:  # the last epoch's state goes straight into the results
            work.save(_checkpoint(progress, model, optimizer, generator))
            saved_at = time.monotonic()
        if curve is not None:
            curve.log(epoch, live_values(row))
        if on_epoch is not None:
            on_epoch(epoch)
    rows = progress.curve
    if ccfg.selection == "test_reference":
        per_set = {name: reference_epoch(rows, f"test_loss_{name}") for name in tests}
        return rows, per_set, {name: progress.test_preds[name][epoch] for name, epoch in per_set.items()}
    if progress.best_state is not None:
        model.load_state_dict({**model.state_dict(), **progress.best_state})
    preds = {name: evaluate(model, test, ccfg.batch_size, ccfg.crop_size)[1] for name, test in tests.items()}
    return rows, dict.fromkeys(tests, progress.chosen), preds


def live_values(row: dict) -> dict[str, float]:
    """A curve row under DVCLive's names: train/loss, train/accuracy_pct, train/lr, val/..., {test set}/...

    Each name is one TSV (plots/metrics/{name}.tsv) and one plot in `dvc plots show`."""
    values = {}
    for key, value in row.items():
        if key in _LIVE_NAMES:
            values[_LIVE_NAMES[key]] = value
        for prefix, measure in (("test_loss_", "loss"), ("test_accuracy_pct_", "accuracy_pct")):
            if key.startswith(prefix):
                values[f"{key.removeprefix(prefix)}/{measure}"] = value
    return values


_LIVE_NAMES = {"loss": "train/loss", "accuracy_pct": "train/accuracy_pct", "lr": "train/lr",
               "val_loss": "val/loss", "val_accuracy_pct": "val/accuracy_pct"}


@dataclass
class _Progress:
    """What fit carries from epoch to epoch besides the model, optimizer and generator."""
    epoch: int = 0  # epochs done
    curve: list = field(default_factory=list)
    chosen: int = 0  # "val": the epoch of lowest validation loss so far
    best_val_loss: float = math.inf
    best_state: dict | None = None  # "val": that epoch's learned weights (_learned)
    test_preds: dict = field(default_factory=dict)  # "test_reference": test name -> epoch -> predictions


def _learned(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of the state that training changes: trainable parameters and buffers (BatchNorm
    statistics move even in a frozen backbone). The rest is rebuilt the same from the seed or weights."""
    changing = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in changing}


def _checkpoint(progress: _Progress, model: nn.Module, optimizer, generator: torch.Generator) -> dict:
    device = next(model.parameters()).device
    return {"progress": dataclasses.asdict(progress), "model": _learned(model), "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(), "rng": torch.get_rng_state(),  # dropout on the CPU
            "device_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}  # on the GPU


def _restore(state: dict, model: nn.Module, optimizer, generator: torch.Generator) -> _Progress:
    model.load_state_dict({**model.state_dict(), **state["model"]})
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state["device_rng"] is not None:
        torch.cuda.set_rng_state(state["device_rng"], next(model.parameters()).device)
    return _Progress(**state["progress"])


def reference_epoch(curve: list[dict], key: str) -> int:
    """The reference rule: the epoch of lowest `key` (one test set's loss) after REFERENCE_AFTER_EPOCH;
    runs that short choose among every epoch.

    The reference counts epochs from 0: its epoch 10 (our 11) sets the bar and a later epoch is
    kept only if it beats the best so far, so ties keep the earliest, as min() does. It never saves
    epoch 11's weights, though: when no later epoch beats it, the reference returns the untrained
    initial weights. We keep epoch 11 instead.
    """
    eligible = [r for r in curve if r["epoch"] > REFERENCE_AFTER_EPOCH] or curve
    return min(eligible, key=lambda r: r[key])["epoch"]


# --- metrics -------------------------------------------------------------------------------

# --- wiring --------------------------------------------------------------------------------

def run(split_dir: Path, images_dir: Path, syn_dir: Path | None, outputs: dict[str, Path], arch: str,
        train_type: str, cfg: Config, seed: int, on_epoch=None, keep: Path | None = None,
        live_dir: Path | None = None, weights: Path | None = None) -> list[dict]:
    """Train one classifier on split_dir/train.csv (+ synthetic images), test it on each
    {test_name}.csv of `outputs` (test name -> metrics JSON path), write and return the metrics.
    keep: the select stage's kept.csv; only the synthetic images it lists are trained on.
    weights: the backbone file classify.pretrained starts from (backbone.source world; see build_classifier).

    An interrupted run continues from its last finished epoch (resume.Work beside the first
    metrics file, kept until the metrics are written) and gives the metrics an uninterrupted one
    gives; a second run on the same outputs waits for the first. live_dir: the training curve
    (train loss, accuracy and learning rate, and validation or test loss and accuracy where the
    selection rule computes them) as a DVCLive folder, one row per epoch.
    """
    ccfg, labels = cfg.classify, list(cfg.subset.labels)
    train_rows = read_split(split_dir, "train")
    tests_rows = {name: read_split(split_dir, name) for name in outputs}
    manifest = read_manifest(syn_dir, train_type, keep)
    train_items, val_items = training_items(train_rows, manifest, train_type, images_dir, syn_dir,
                                            ccfg.selection, ccfg.val_fraction, seed)
    leaked = set(train_items.md5hash) & set().union(*(set(rows.md5hash) for rows in tests_rows.values()))
    if leaked:
        raise SkinaugError(f"{len(leaked)} test image(s) (or their synthetic offspring) are in training, e.g. {min(leaked)}")
    device = sd21.pick_device(cfg.model.device)
    torch.manual_seed(seed)  # head initialisation and dropout
    model = build_classifier(arch, len(labels), ccfg.pretrained, ccfg.freeze_backbone, ccfg.crop_size,
                             weights).to(device)
    train = load_set(train_items, labels, ccfg.image_size, device, whole=True)
    val = None if val_items is None else load_set(val_items, labels, ccfg.image_size, device)
    tests = {name: load_set(real_items(rows, images_dir), labels, ccfg.image_size, device)
             for name, rows in tests_rows.items()}
    fingerprint = {"arch": arch, "train_type": train_type, "seed": seed, "labels": labels,
                   "device": device.type,  # a checkpoint made on another card resumes; one made on the CPU does not
                   "settings": dataclasses.asdict(ccfg),
                   "backbone": None if weights is None else hashing.file_digest(weights),
                   "splits": {name: hashing.file_digest(Path(split_dir) / f"{name}.csv") for name in ["train", *outputs]},
                   "manifest": None if manifest is None else hashing.file_digest(Path(syn_dir) / "manifest.csv"),
                   "keep": None if keep is None or manifest is None else hashing.file_digest(keep)}
    with (resume.Work(next(iter(outputs.values())), fingerprint) as work,  # waits while another run writes it
          live.Curve(live_dir) as curve):
        _, chosen, preds = fit(model, train, val, tests, cfg, seed, desc=f"{arch} {train_type} seed {seed}",
                               work=work, on_epoch=on_epoch, curve=curve)
        kinds = train.table.kind.value_counts()
        scenario = splits.split_scenario(split_dir, cfg.scenario)
        records = []
        for test_name, out_json in outputs.items():
            test = tests[test_name]
            predictions = test.table[["md5hash", "fitzpatrick_scale", "label"]].assign(
                predicted=[labels[i] for i in preds[test_name].tolist()])
            atomic.write_csv(predictions_path(out_json), predictions)  # before the JSON, which marks the run done
            record = {
                "scenario": scenario, "seed": seed, "arch": arch, "train_type": train_type, "test_name": test_name,
                "selection": {"rule": ccfg.selection, "label": SELECTION_LABELS[ccfg.selection],
                              "honest": ccfg.selection != "test_reference"},
                "chosen_epoch": chosen[test_name], "epochs": ccfg.epochs, "pretrained": ccfg.pretrained,
                "backbone": cfg.backbone.source if ccfg.pretrained else None,
                "freeze_backbone": ccfg.freeze_backbone, "profile": cfg.profile, "labels": labels,
                "n_train": {"real": int(kinds.get("real", 0)), "syn": int(kinds.get("syn", 0)),
                            "total": len(train.targets)},
                "n_val": 0 if val is None else len(val.targets),
                **score(test.targets.cpu(), preds[test_name], labels, test.table.fitzpatrick_scale),
                # no timing: a resumed run's metrics equal an uninterrupted one's (the CLI prints the time);
                # the training curve is in live_dir (DVCLive)
                "device": str(device),
            }
            atomic.write_json(out_json, record)
            records.append(record)
        work.discard()
    return records


# --- the reference classifier (quality and select) -----------------------------------------

def train_reference(split_dir: Path, images_dir: Path, out_path: Path, arch: str, cfg: Config, seed: int,
                    weights: Path | None = None) -> dict:
    """Train a classifier on the split's real training images only and save it (torch.save, atomic).

    The recipe and seed of classify_real's `arch` classifier (classify.* settings, the same order
    of random draws), so on one device it is that classifier. It never reads a test split: under
    classify.selection "test_reference" it keeps the last epoch. Saved: arch, labels and the learned
    part of the weights (_learned; a frozen pretrained backbone is rebuilt from its ImageNet file, or
    from `weights`, the backbone file, which load_reference is given again).
    """
    ccfg, labels = cfg.classify, list(cfg.subset.labels)
    train_rows = read_split(split_dir, "train")
    selection = "last" if ccfg.selection == "test_reference" else ccfg.selection
    train_items, val_items = training_items(train_rows, None, "real", images_dir, None, selection,
                                            ccfg.val_fraction, seed)
    device = sd21.pick_device(cfg.model.device)
    torch.manual_seed(seed)
    model = build_classifier(arch, len(labels), ccfg.pretrained, ccfg.freeze_backbone, ccfg.crop_size,
                             weights).to(device)
    train = load_set(train_items, labels, ccfg.image_size, device, whole=True)
    val = None if val_items is None else load_set(val_items, labels, ccfg.image_size, device)
    cfg = dataclasses.replace(cfg, classify=dataclasses.replace(ccfg, selection=selection))
    curve, _, _ = fit(model, train, val, {}, cfg, seed, desc=f"reference {arch} seed {seed}")
    chosen = min(curve, key=lambda r: r["val_loss"]) if val is not None else curve[-1]  # as fit keeps it
    info = {"arch": arch, "labels": labels, "seed": seed, "n_train": len(train.targets),
            "selection": selection, "chosen_epoch": chosen["epoch"]}
    # Saved through memory: torch.save to a path names the zip's records after that path's file name,
    # here a temp name with a pid, so two runs of the same work would give different bytes.
    buffer = io.BytesIO()
    torch.save({**info, "learned": {k: v.cpu() for k, v in _learned(model).items()}}, buffer)
    atomic.write_bytes(out_path, buffer.getvalue())
    return info


def load_reference(path: Path, cfg: Config, device: torch.device,
                   weights: Path | None = None) -> tuple[nn.Module, list[str]]:
    """The classifier train_reference saved, in eval mode on `device`, and its labels.
    weights: the backbone file it was trained from (backbone.source world)."""
    if not Path(path).exists():
        raise SkinaugError(f"{path} not found: run the reference stage first (`dvc repro` runs it)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    labels = list(saved["labels"])
    if labels != list(cfg.subset.labels):
        raise SkinaugError(f"{path} was trained on labels {labels}, not subset.labels: re-run the reference stage")
    ccfg = cfg.classify
    model = build_classifier(saved["arch"], len(labels), ccfg.pretrained, ccfg.freeze_backbone, ccfg.crop_size,
                             weights)
    model.load_state_dict({**model.state_dict(), **saved["learned"]})
    return model.to(device).eval(), labels
