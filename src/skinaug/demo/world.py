"""The embedded demo world: a generated miniature of the study's data (SPEC §1, issue 2).

    skinaug world data/world           # 1,631 images + metadata.csv, ~5 s

Same columns as Fitzpatrick17k and exactly the paper's Table 1 counts. The drawing
pieces (skin per tone, lesion per label, the photograph) are reused by the web
corpus the tiny demo base model is pretrained on.

Over 300 lines for one idea: the drawing functions of the demo world (skin, lesions, the
photograph, the web corpus share them); only the demo profile runs it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinaug import SkinaugError, atomic, paper, prompts
from skinaug.config import SubsetConfig, WorldConfig

# (nine_partition_label, three_partition_label) of each label, as in the real CSV.
_PARTITIONS = {
    "basal cell carcinoma": ("malignant epidermal", "malignant"),
    "folliculitis": ("inflammatory", "non-neoplastic"),
    "nematode infection": ("inflammatory", "non-neoplastic"),
    "neutrophilic dermatoses": ("inflammatory", "non-neoplastic"),
    "prurigo nodularis": ("benign epidermal", "benign"),
    "psoriasis": ("inflammatory", "non-neoplastic"),
    "squamous cell carcinoma": ("malignant epidermal", "malignant"),
}

# --- the demo world ----------------------------------------------------------------
# A fair miniature of the real problem: each label has its own lesion pattern, each
# skin type its own tone, and lesion colours shift with tone (erythema reads red on
# light skin, violaceous-brown and fainter on dark skin), so a classifier that only
# saw light skin loses accuracy on dark skin. Everything is drawn as numpy arrays of
# shape (B, S, S) over a batch of B images, in coordinates where the image spans -1..1.

# Typical skin colour per Fitzpatrick type (sRGB 0-255); photos vary around these.
SKIN_RGB = {
    1: (243, 216, 198),
    2: (228, 188, 157),
    3: (201, 153, 114),
    4: (163, 113, 79),
    5: (116, 77, 53),
    6: (69, 46, 34),
}
# Lesion colours at FST 1 and at FST 6, interpolated by type in between. "rel" colours
# multiply the skin: erythema is blood seen through the epidermis, so as melanin rises
# it darkens and turns violaceous or brown. "abs" colours lie on top (scale, pus, crust).
LESION_COLOURS = {
    "erythema": ("rel", (1.00, 0.55, 0.56), (0.76, 0.56, 0.68)),
    "violet": ("rel", (0.72, 0.44, 0.66), (0.72, 0.56, 0.74)),
    "pigment": ("rel", (0.66, 0.50, 0.40), (0.55, 0.47, 0.46)),
    "ulcer": ("abs", (0.74, 0.30, 0.30), (0.40, 0.16, 0.17)),
    "pearl": ("abs", (0.95, 0.78, 0.78), (0.12, 0.08, 0.07)),  # BCC: pearly on light skin, pigmented on dark
    "crust": ("abs", (0.60, 0.42, 0.22), (0.25, 0.16, 0.11)),
    "scale": ("abs", (0.94, 0.93, 0.90), (0.66, 0.62, 0.59)),
    "pus": ("abs", (0.96, 0.91, 0.63), (0.80, 0.74, 0.50)),
}
# Lesions are drawn with less contrast on dark skin (layer opacity x this, FST 1 -> 6).
_CONTRAST = (1.0, 0.8)


def draw_skin(fst, rng: np.random.Generator, size: int) -> np.ndarray:
    """Bare skin of the given Fitzpatrick types: (B, size, size, 3) floats in 0..1, unlit."""
    fst = np.asarray(fst, dtype=int)
    n = len(fst)
    base = np.array([SKIN_RGB[int(f)] for f in fst], np.float32) / 255
    # People of one type still differ: lightness +-6 %, a little more red or yellow.
    base *= np.exp(rng.normal(0, 0.06, (n, 1)) + rng.normal(0, 0.025, (n, 3))).astype(np.float32)
    yy, xx = _grid(size)
    angle, phase, freq = _uniform(rng, n, 0, np.pi), _uniform(rng, n, 0, 2 * np.pi), _uniform(rng, n, 8, 14)
    creases = np.sin(freq * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) + phase).clip(0) ** 12
    texture = (1 + 0.03 * _smooth_noise(rng, n, size, 5) + 0.015 * rng.standard_normal((n, size, size), np.float32)
               - 0.03 * creases).astype(np.float32)
    skin = base[:, None, None, :] * texture[..., None]
    # A few moles anywhere, so that "small dark dots" alone does not give a label away.
    moles = np.zeros((n, size, size), np.float32)
    for x0, y0, on in _scatter(rng, n, 3, 0, 0.9):
        d, _ = _polar(xx - x0, yy - y0)
        moles = _union(moles, on * _disc(d, _uniform(rng, n, 0.015, 0.04), 0.01))
    skin = skin * (1 - 0.8 * moles[..., None] * (1 - np.array([0.55, 0.42, 0.34], np.float32)))
    return skin.astype(np.float32)


def lesion_colours(fst, rng: np.random.Generator | None = None) -> dict[str, tuple[str, np.ndarray]]:
    """Each LESION_COLOURS entry for these skin types: name -> ("rel"|"abs", (B, 3))."""
    t = (np.asarray(fst, dtype=np.float32) - 1) / 5
    if rng is not None:
        t = (t + rng.normal(0, 0.04, t.shape)).clip(0, 1)
    out = {}
    for name, (kind, light, dark) in LESION_COLOURS.items():
        out[name] = (kind, np.asarray(light, np.float32) * (1 - t[:, None]) + np.asarray(dark, np.float32) * t[:, None])
    return out


def draw_lesion(label: str, skin: np.ndarray, fst, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one `label` lesion per image onto `skin` (from draw_skin).

    Returns (colour (B,S,S,3), height (B,S,S)); the height map shades the relief when
    `photograph` lights the scene.
    """
    n, size = skin.shape[0], skin.shape[1]
    u, v = _lesion_frame(rng, n, size)
    layers = LESIONS[label](u, v, rng, n)
    colours = lesion_colours(fst, rng)
    t = (np.asarray(fst, dtype=np.float32) - 1) / 5
    contrast = (_CONTRAST[0] + (_CONTRAST[1] - _CONTRAST[0]) * t)[:, None, None, None]
    return _paint(skin, layers, colours, contrast), layers.get("height", np.zeros(u.shape, np.float32))


def _paint(img: np.ndarray, layers: dict, colours: dict, contrast=None) -> np.ndarray:
    """Lay each colour layer's opacity map (x contrast) over img, in `colours` order, bottom to top."""
    for name, (kind, rgb) in colours.items():
        if name not in layers:
            continue
        alpha = layers[name][..., None].clip(0, 1)
        if contrast is not None:
            alpha = alpha * contrast
        top = img * rgb[:, None, None, :] if kind == "rel" else rgb[:, None, None, :]
        img = img * (1 - alpha) + top * alpha
    return img


def photograph(img: np.ndarray, height: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light, blur and expose the scene like a clinical photo: uint8 (B, S, S, 3)."""
    n, size = img.shape[:2]
    yy, xx = _grid(size)
    light = _uniform(rng, n, 0, 2 * np.pi)
    lx, ly = np.cos(light), np.sin(light)
    # Relief: slopes facing the light brighten, the others darken; domes get a sheen.
    gy, gx = np.gradient(height * size / 16, axis=(1, 2))
    facing = gx * lx + gy * ly
    shade = 1 + 0.3 * facing + 0.3 * facing.clip(0) ** 2
    # Uneven lighting across the frame and a little falloff towards the corners.
    shade = shade * (1 + _uniform(rng, n, 0, 0.15) * (xx * lx + yy * ly)
                     - _uniform(rng, n, 0, 0.2) * (xx ** 2 + yy ** 2) / 2)
    img = img * shade[..., None]
    # Some photos are slightly out of focus.
    blurred = (img + np.roll(img, 1, 1) + np.roll(img, -1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 2)) / 5
    focus = _uniform(rng, n, 0, 0.7)[..., None]
    img = img * (1 - focus) + blurred * focus
    img = img * rng.normal(1, 0.025, (n, 1, 1, 3)).astype(np.float32)  # white balance
    img += 0.012 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def render(label: str, fst, rng: np.random.Generator, size: int) -> np.ndarray:
    """Photos of one `label` lesion on each skin type in `fst`: uint8 (B, size, size, 3)."""
    skin = draw_skin(fst, rng, size)
    img, height = draw_lesion(label, skin, fst, rng)
    return photograph(img, height, rng)


def make_world(world: WorldConfig, subset: SubsetConfig, out_dir: Path) -> pd.DataFrame:
    """Write the demo world: out_dir/metadata.csv and out_dir/images/{md5hash}.jpg.

    Exactly the paper's Table 1 counts for subset.labels (1,631 rows for all seven),
    shuffled like the real CSV, about 1 % near-duplicate photos (as in the real data)
    and the same seed always gives the same rows and bytes. A few seconds.
    """
    unknown = [label for label in subset.labels if label not in paper.TABLE1_COUNTS]
    if unknown:
        raise SkinaugError(f"the demo world has no pattern for {', '.join(unknown)}; "
                           f"it knows {', '.join(paper.TABLE1_COUNTS)}")
    rng = np.random.default_rng(world.seed)
    cells = [(label, fst) for label in subset.labels for fst, k in paper.TABLE1_COUNTS[label].items() for _ in range(k)]
    order = rng.permutation(len(cells))
    labels = np.array([cells[i][0] for i in order])
    fsts = np.array([cells[i][1] for i in order])
    size = world.image_size
    pixels = np.empty((len(cells), size, size, 3), np.uint8)
    batch = max(1, 256 * 64 ** 2 // size ** 2)  # images drawn at once: ~100 MB of work arrays at any size
    for label in subset.labels:
        rows = np.flatnonzero(labels == label)
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pixels[chunk] = render(label, fsts[chunk], rng, size)
    _near_duplicates(pixels, labels, fsts, rng)

    md5s = [hashlib.md5(f"world-{world.seed}-{i}".encode()).hexdigest() for i in range(len(cells))]
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    with atomic.locked(images):  # a second run waits: the clean-up below would delete its temp files
        for stale in {p.name for p in images.iterdir()} - {f"{m}.jpg" for m in md5s}:  # also killed writes
            (images / stale).unlink()
        for md5, arr in zip(md5s, pixels):
            with atomic.atomic_path(images / f"{md5}.jpg", sweep=False) as tmp:
                Image.fromarray(arr).save(tmp, format="JPEG", quality=95)

    urls = [f"https://example.invalid/world/{m}.jpg" for m in md5s]
    # Raters disagree by one type now and then; -1 marks "could not tell", as in the real CSV.
    centaur = np.where(rng.random(len(fsts)) < 0.15, fsts + rng.choice([-1, 1], len(fsts)), fsts).clip(1, 6)
    centaur = np.where(rng.random(len(fsts)) < 0.05, -1, centaur)
    meta = pd.DataFrame({
        "md5hash": md5s,
        "fitzpatrick_scale": fsts,
        "fitzpatrick_centaur": centaur,
        "label": labels,
        "nine_partition_label": [_PARTITIONS[label][0] for label in labels],
        "three_partition_label": [_PARTITIONS[label][1] for label in labels],
        "qc": pd.Series([None] * len(cells), dtype=object),
        "url": urls,
        "url_alphanum": [re.sub(r"[^0-9a-zA-Z]", "", u) + ".jpg" for u in urls],
    })
    atomic.write_csv(Path(out_dir) / "metadata.csv", meta)
    return meta


def _near_duplicates(pixels, labels, fsts, rng, share: float = 0.01) -> None:
    """Turn ~`share` of the photos into copies of another photo of the same label and type.

    The real data holds the same photo more than once (re-uploaded, resized,
    re-compressed, under another md5hash); the copies give duplicate-aware splitting
    (splits.dedupe) something to find in the demo world too.
    """
    size = pixels.shape[1]
    copies = rng.choice(len(pixels), size=int(round(share * len(pixels))), replace=False)
    for i in copies:
        same = np.flatnonzero((labels == labels[i]) & (fsts == fsts[i]))
        same = same[~np.isin(same, copies)]
        if not len(same):
            continue
        src = Image.fromarray(pixels[rng.choice(same)])
        small = int(rng.integers(size * 3 // 4, size))
        resized = np.asarray(src.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR), np.float32)
        pixels[i] = (resized * rng.uniform(0.93, 1.07) + rng.normal(0, 2, resized.shape)).clip(0, 255).astype(np.uint8)


# Lesion patterns: fn(u, v, rng, n) -> {layer name: (n, S, S) opacity, "height": relief}.
# (u, v) are lesion-centred coordinates; names are LESION_COLOURS keys.

def _bcc(u, v, rng, n):
    """Basal cell carcinoma: one pearly dome with a rolled border, fine telangiectasia, sometimes ulcerated."""
    r = _uniform(rng, n, 0.25, 0.38)
    d, phi = _polar(u, v * _uniform(rng, n, 0.8, 1.2))
    body = _disc(d, r, 0.03)
    border = np.exp(-((d - 0.85 * r) / (0.12 * r)) ** 2)
    vessels = np.zeros_like(u)
    for _ in range(3):  # thin wandering vessels across the dome
        a, k, p = _uniform(rng, n, 0, np.pi), _uniform(rng, n, 8, 16), _uniform(rng, n, 0, 6.3)
        along = u * np.cos(a) + v * np.sin(a)
        across = -u * np.sin(a) + v * np.cos(a) - 0.05 * np.sin(k * along + p) - _uniform(rng, n, -0.6, 0.6) * r
        vessels = _union(vessels, np.exp(-(across / 0.02) ** 2) * body)
    ulcer = _disc(d, 0.3 * r, 0.03) * (rng.random((n, 1, 1)) < 0.4)
    return {"erythema": 0.35 * _disc(d, 1.15 * r, 0.06) + 0.6 * vessels,
            "pearl": 0.7 * body + 0.3 * border, "ulcer": 0.8 * ulcer, "crust": 0.5 * ulcer,
            "height": _dome(d, r) + 0.2 * border - 0.5 * ulcer}


def _folliculitis(u, v, rng, n):
    """Folliculitis: a scatter of small red follicular papules, most with a yellow-white pustule."""
    red, pus, height = (np.zeros_like(u) for _ in range(3))
    for x0, y0, on in _scatter(rng, n, 16, 8, 0.65):
        r = _uniform(rng, n, 0.035, 0.06)
        d, _ = _polar(u - x0, v - y0)
        red = _union(red, on * _disc(d, 2.2 * r, 0.03))
        pus = _union(pus, on * _disc(d, 0.7 * r, 0.015) * (rng.random((n, 1, 1)) < 0.75))
        height = height + on * _dome(d, 1.5 * r) * 0.5
    return {"erythema": 0.75 * red, "pus": 0.9 * pus, "height": height}


def _nematode(u, v, rng, n):
    """Nematode infection (larva migrans): one or two raised, serpiginous red tracks."""
    track, halo = np.zeros_like(u), np.zeros_like(u)
    for j in range(2):
        on = (rng.random((n, 1, 1)) < 0.5) | (j == 0)
        a, amp = _uniform(rng, n, 0, np.pi), _uniform(rng, n, 0.08, 0.18)
        k, p, off = _uniform(rng, n, 6, 11), _uniform(rng, n, 0, 6.3), _uniform(rng, n, -0.25, 0.25) * j
        along = u * np.cos(a) + v * np.sin(a)
        across = -u * np.sin(a) + v * np.cos(a) - off
        centre = amp * np.sin(k * along + p)
        dist = np.abs(across - centre) / np.sqrt(1 + (amp * k * np.cos(k * along + p)) ** 2)
        length = _disc(np.abs(along), _uniform(rng, n, 0.4, 0.7), 0.04)
        w = _uniform(rng, n, 0.03, 0.045)
        track = _union(track, on * length * np.exp(-(dist / w) ** 2))
        halo = _union(halo, on * length * np.exp(-(dist / (3 * w)) ** 2))
    return {"erythema": 0.3 * halo + 0.75 * track, "pigment": 0.25 * track, "pus": 0.1 * track,
            "height": 0.6 * track}


def _neutrophilic(u, v, rng, n):
    """Neutrophilic dermatoses: juicy soft-edged plaques (Sweet) or an ulcer with a violaceous rim (pyoderma)."""
    sweet = rng.random((n, 1, 1)) < 0.6
    plaque, height = np.zeros_like(u), np.zeros_like(u)
    for x0, y0, on in _scatter(rng, n, 4, 2, 0.4):
        d, phi = _polar(u - x0, v - y0)
        r = _uniform(rng, n, 0.18, 0.3) * _wobble(phi, rng, n, 0.15)
        plaque = _union(plaque, on * _disc(d, r, 0.035))
        height = height + on * _dome(d, r) * 0.8
    d, phi = _polar(u, v)
    r = _uniform(rng, n, 0.32, 0.48) * _wobble(phi, rng, n, 0.2)
    ulcer = _disc(d, 0.8 * r, 0.03)
    rim = np.exp(-((d - 0.85 * r) / (0.1 * r)) ** 2)
    fibrin = ulcer * (_smooth_noise(rng, n, u.shape[1], 6) > 0.3)
    return {"erythema": np.where(sweet, 0.85 * plaque, 0.4 * _disc(d, 1.2 * r, 0.08)),
            "violet": np.where(sweet, 0.45 * plaque, 0.9 * rim), "ulcer": np.where(sweet, 0, 0.85 * ulcer),
            "pus": np.where(sweet, 0.1 * plaque, 0.5 * fibrin),
            "height": np.where(sweet, height, 0.4 * rim - 0.3 * ulcer)}


def _prurigo(u, v, rng, n):
    """Prurigo nodularis: many firm, hyperpigmented dome nodules, often with an excoriated crusted top."""
    pig, crust, red, height = (np.zeros_like(u) for _ in range(4))
    for x0, y0, on in _scatter(rng, n, 12, 5, 0.7):
        r = _uniform(rng, n, 0.07, 0.11)
        d, _ = _polar(u - x0, v - y0)
        pig = _union(pig, on * _disc(d, r, 0.02))
        red = _union(red, on * _disc(d, 1.5 * r, 0.03))
        crust = _union(crust, on * _disc(d, 0.35 * r, 0.015) * (rng.random((n, 1, 1)) < 0.6))
        height = height + on * _dome(d, r)
    return {"erythema": 0.3 * red, "pigment": 0.8 * pig, "crust": 0.85 * crust, "height": height}


def _psoriasis(u, v, rng, n):
    """Psoriasis: sharply demarcated red plaques under thick silvery scale."""
    plaque = np.zeros_like(u)
    for x0, y0, on in _scatter(rng, n, 3, 1, 0.35):
        d, phi = _polar(u - x0, v - y0)
        r = _uniform(rng, n, 0.25, 0.42) * _wobble(phi, rng, n, 0.2)
        plaque = _union(plaque, on * _disc(d, r, 0.015))
    flakes = _disc(-_smooth_noise(rng, n, u.shape[1], 20), -_uniform(rng, n, -0.2, 0.6), 0.15)
    return {"erythema": 0.9 * plaque, "scale": 0.8 * plaque * flakes, "height": 0.25 * plaque}


def _scc(u, v, rng, n):
    """Squamous cell carcinoma: an irregular keratotic nodule, rough crust on a red base, sometimes ulcerated."""
    d, phi = _polar(u, v)
    r = _uniform(rng, n, 0.25, 0.38) * _wobble(phi, rng, n, 0.3)
    body = _disc(d, r, 0.025)
    rough = _smooth_noise(rng, n, u.shape[1], 10)
    ulcer = _disc(d, 0.35 * r, 0.03) * (rng.random((n, 1, 1)) < 0.4)
    return {"erythema": 0.7 * _disc(d, 1.2 * r, 0.05), "ulcer": 0.8 * ulcer,
            "crust": body * (0.55 + 0.3 * (rough > 0)), "scale": 0.7 * body * (rough > 0.7),
            "height": _dome(d, r) * 0.7 + 0.15 * body * rough}


LESIONS = {
    "basal cell carcinoma": _bcc,
    "folliculitis": _folliculitis,
    "nematode infection": _nematode,
    "neutrophilic dermatoses": _neutrophilic,
    "prurigo nodularis": _prurigo,
    "psoriasis": _psoriasis,
    "squamous cell carcinoma": _scc,
}


def _grid(size: int):
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[:, None], c[None, :]


def _lesion_frame(rng, n, size):
    """Lesion-centred coordinates with the nuisance of real photos: position, scale, rotation."""
    yy, xx = _grid(size)
    cx, cy = _uniform(rng, n, -0.2, 0.2), _uniform(rng, n, -0.2, 0.2)
    scale, rot = _uniform(rng, n, 1.0, 1.6), _uniform(rng, n, 0, 2 * np.pi)
    dx, dy = xx - cx, yy - cy
    return (dx * np.cos(rot) + dy * np.sin(rot)) / scale, (-dx * np.sin(rot) + dy * np.cos(rot)) / scale


def _uniform(rng, n, lo, hi):
    return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)


def _polar(u, v):
    return np.hypot(u, v), np.arctan2(v, u)


def _disc(d, r, edge):
    """Soft-edged disc opacity (edge = width of the blur)."""
    return 1 / (1 + np.exp(np.clip((d - r) / edge, -30, 30)))


def _dome(d, r):
    """Smooth bump of height 1 and radius r (flat at its foot, so no hard shading edge)."""
    return (1 - (d / r) ** 2).clip(0) ** 1.5


def _union(a, b):
    return 1 - (1 - a) * (1 - b)


def _wobble(phi, rng, n, amp):
    """Irregular outline: radius factor 1 + a few random low harmonics of the angle."""
    out = 1
    for k in (2, 3, 5):
        out = out + _uniform(rng, n, 0, amp) * np.cos(k * phi + _uniform(rng, n, 0, 2 * np.pi))
    return out


def _scatter(rng, n, most, fewest, radius):
    """Yield (x0, y0, on) for up to `most` elements per image, `fewest`..`most` of them switched on."""
    count = rng.integers(fewest, most + 1, (n, 1, 1))
    for k in range(most):
        rad, ang = radius * np.sqrt(_uniform(rng, n, 0, 1)), _uniform(rng, n, 0, 2 * np.pi)
        yield rad * np.cos(ang), rad * np.sin(ang), (k < count).astype(np.float32)


def _smooth_noise(rng, n, size, cells):
    """Smooth random field of about unit variance: a cells x cells grid, smoothly interpolated."""
    grid = rng.standard_normal((n, cells + 1, cells + 1)).astype(np.float32)
    c = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(c.astype(int), cells - 1)
    f = c - i
    f = f * f * (3 - 2 * f)
    rows = grid[:, i, :] * (1 - f)[None, :, None] + grid[:, i + 1, :] * f[None, :, None]
    return (rows[:, :, i] * (1 - f) + rows[:, :, i + 1] * f) * 1.4


# --- the "web": generic marks on every skin type --------------------------------------
# Stable Diffusion learned from the web what skin of every tone looks like; the tiny demo
# model learns it from this corpus instead. Its marks are generic (moles, rashes, scars,
# freckles, bruises, and random lesions built from blobs, rings, papules and streaks in the
# world's lesion colours), none of the seven study conditions' patterns, and its captions use
# the prompts' own skin-type wording.


def _mole(u, v, rng, n):
    d, phi = _polar(u, v)
    r = _uniform(rng, n, 0.08, 0.2) * _wobble(phi, rng, n, 0.08)
    return {"pigment": 0.95 * _disc(d, r, 0.02), "height": 0.5 * _dome(d, r)}


def _rash(u, v, rng, n):
    d, phi = _polar(u, v)
    patch = _disc(d, _uniform(rng, n, 0.4, 0.7) * _wobble(phi, rng, n, 0.15), 0.15)
    blotch = (0.5 + 0.5 * _smooth_noise(rng, n, u.shape[-1], 6)).clip(0, 1)
    return {"erythema": 0.8 * patch * blotch}


def _scar(u, v, rng, n):
    bend = _uniform(rng, n, -0.6, 0.6)
    line = _disc(np.abs(v - bend * u ** 2), _uniform(rng, n, 0.02, 0.05), 0.015) * _disc(np.abs(u), 0.6, 0.05)
    return {"scale": 0.5 * line, "erythema": 0.3 * line}


def _freckles(u, v, rng, n):
    dots = np.zeros_like(u)
    for x0, y0, on in _scatter(rng, n, 25, 10, 0.8):
        d, _ = _polar(u - x0, v - y0)
        dots = _union(dots, on * _disc(d, _uniform(rng, n, 0.02, 0.04), 0.015))
    return {"pigment": 0.6 * dots}


def _bruise(u, v, rng, n):
    d, phi = _polar(u, v)
    patch = _disc(d, _uniform(rng, n, 0.25, 0.45) * _wobble(phi, rng, n, 0.2), 0.2)
    return {"violet": 0.9 * patch, "pigment": 0.3 * patch}


def _lesion(u, v, rng, n):
    """One to three random primitives (blob, ring, cluster of papules, streak), each in a random one
    of the world's lesion colours: a broad prior of lesion-like structure, like the web's variety,
    so that the model can redraw a lesion it has never seen on any skin tone."""
    layers = {name: np.zeros_like(u) for name in LESION_COLOURS}
    height = np.zeros_like(u)
    for slot in range(3):
        on = np.ones((n, 1, 1), np.float32) if slot == 0 else (_uniform(rng, n, 0, 1) < 0.5).astype(np.float32)
        x, y = u - _uniform(rng, n, -0.4, 0.4), v - _uniform(rng, n, -0.4, 0.4)
        d, phi = _polar(x, y)
        radius = _uniform(rng, n, 0.1, 0.45) * _wobble(phi, rng, n, 0.15)
        blob = _disc(d, radius, 0.03)
        ring = blob * (1 - _disc(d, radius * _uniform(rng, n, 0.4, 0.75), 0.03))
        papules, bumps = np.zeros_like(u), np.zeros_like(u)
        for x0, y0, dot in _scatter(rng, n, 10, 3, 0.6):
            dd, _ = _polar(x - x0, y - y0)
            r = _uniform(rng, n, 0.03, 0.08)
            papules, bumps = _union(papules, dot * _disc(dd, r, 0.015)), np.maximum(bumps, dot * _dome(dd, r))
        bend = _uniform(rng, n, -1.5, 1.5)
        streak = _disc(np.abs(y - bend * x ** 2), _uniform(rng, n, 0.02, 0.06), 0.015) * _disc(np.abs(x), _uniform(rng, n, 0.2, 0.7), 0.05)
        kind = rng.integers(0, 4, (n, 1, 1))
        alpha = on * _uniform(rng, n, 0.5, 1.0) * np.select([kind == 0, kind == 1, kind == 2], [blob, ring, papules], streak)
        raised = (kind == 2) * bumps + (kind == 0) * (_uniform(rng, n, 0, 1) < 0.5) * _dome(d, radius)
        height = np.maximum(height, on * 0.6 * raised)
        colour = rng.integers(0, len(LESION_COLOURS), (n, 1, 1))
        for i, name in enumerate(LESION_COLOURS):
            layers[name] = _union(layers[name], alpha * (colour == i))
    return {**layers, "height": height.astype(np.float32)}


GENERIC_MARKS = {"mole": _mole, "rash": _rash, "scar": _scar, "freckles": _freckles, "bruise": _bruise,
                 "lesion": _lesion}
# Half the corpus is random lesions, for variety; the named marks share the other half. With
# them the demo base darkens light skin asked for FST 5 or 6 (which of the two it reaches, the
# base's rounding decides: README, "FST 5 is not reached everywhere").
_MARK_SHARE = {"lesion": 0.5}


def web_corpus(n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n captioned photos of generic marks on skin types 1-6 (uniform): (uint8 (n,S,S,3), fsts, captions)."""

    rng = np.random.default_rng(seed)
    fsts = rng.integers(1, 7, n)
    names = sorted(GENERIC_MARKS)
    rest = (1 - sum(_MARK_SHARE.values())) / (len(names) - len(_MARK_SHARE))
    marks = rng.choice(names, n, p=[_MARK_SHARE.get(m, rest) for m in names])
    pixels = np.empty((n, size, size, 3), np.uint8)
    for mark in names:
        rows = np.flatnonzero(marks == mark)
        if not len(rows):
            continue
        skin = draw_skin(fsts[rows], rng, size)
        u, v = _lesion_frame(rng, len(rows), size)
        layers = GENERIC_MARKS[mark](u, v, rng, len(rows))
        img = _paint(skin, layers, lesion_colours(fsts[rows], rng))
        pixels[rows] = photograph(img, layers.get("height", np.zeros(u.shape, np.float32)), rng)
    article = {"freckles": "", "bruise": "a ", "mole": "a ", "rash": "a ", "scar": "a ", "lesion": "a "}
    captions = [prompts.skin_text(article[m] + m, f) for m, f in zip(marks, fsts)]
    return pixels, fsts, captions
