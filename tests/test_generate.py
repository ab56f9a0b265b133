"""Generation on the tiny model (CPU, 32 px): determinism, batching, pairing, resume, adapters, errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from dvcrepo import start_two_waiting
from skinaug import SkinaugError, config, prompts
from skinaug.data import trainset
from skinaug.diffusion import adapters as A
from skinaug.diffusion import generate as G

LABELS = list(prompts.TOKENS)
# Four sources, one per skin type, each of another label (light ones become 5 or 6).
SOURCES = [("a" * 32, LABELS[0], 1), ("b" * 32, LABELS[1], 2), ("c" * 32, LABELS[2], 5), ("d" * 32, LABELS[5], 6)]


@pytest.fixture(scope="module")
def cfg(repo_cfg):
    r = config.replace
    return r(repo_cfg,
             model=r(repo_cfg.model, resolution=32, mixed_precision="no", device="cpu"),
             lora=r(repo_cfg.lora, mode="joint"),
             generate=r(repo_cfg.generate, per_source=2, strength=0.5, steps=8, guidance=2.0, out_size=32,
                        batch_size=4, strategy="img2img_ti_lora"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """train.csv and images/{md5hash}.jpg of four distinct random images."""
    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for md5hash, _, _ in SOURCES:
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{md5hash}.jpg")
    pd.DataFrame(SOURCES, columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(root / "train.csv", index=False)
    return root


def _lora_file(base: Path, folder: Path, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it act
            torch.nn.init.normal_(p, std=0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder / A.LORA_FILE


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base):
    """ti/<name>.safetensors per token, lora/ (joint) and other_lora/ (another LoRA)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adapters")
    (root / "ti").mkdir()
    gen = torch.Generator().manual_seed(0)
    for tok in prompts.TOKENS.values():
        save_file({tok: torch.randn(1, 32, generator=gen)}, root / "ti" / f"{tok.strip('<>')}.safetensors")
    _lora_file(tiny_base, root / "lora", seed=1)
    _lora_file(tiny_base, root / "other_lora", seed=2)
    return root


def run(world, tiny_base, out, cfg, adapters=None, strategy="img2img_ti_lora", seed=0, **kw):
    ti = adapters / "ti" if adapters else None
    lora = adapters / "lora" if adapters else None
    return G.generate(world / "train.csv", world / "images", tiny_base, out, cfg, seed,
                      ti_dir=kw.pop("ti_dir", ti), lora_dir=kw.pop("lora_dir", lora), strategy=strategy, **kw)


def pixels(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted((out / "images").iterdir())}


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in (a / "images").iterdir())
    return names == sorted(p.name for p in (b / "images").iterdir()) and all(
        (a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, world, tiny_base, adapters, cfg):
    """The uninterrupted one-process run (batch 4) the other runs are compared with."""
    out = tmp_path_factory.mktemp("ref") / "syn"
    run(world, tiny_base, out, cfg, adapters)
    return out


# --- the plan ----------------------------------------------------------------------------------


def test_plan_target_skin_type_prompts_and_seeds(tmp_path, cfg):
    rows = [(f"{i:032x}", LABELS[i % 7], (1, 2, 5, 6)[i % 4]) for i in range(40)]
    pd.DataFrame(rows, columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(tmp_path / "t.csv", index=False)
    plan = G.make_plan(tmp_path / "t.csv", cfg, 0, "img2img_ti_lora")
    assert len(plan) == 80 and list(plan.columns) == G.PLAN_COLUMNS
    light = plan.source_fitzpatrick_scale.isin([1, 2])
    assert set(plan.fitzpatrick_scale[light]) == {5, 6}  # 40 draws: both dark types occur
    assert (plan.fitzpatrick_scale[~light] == plan.source_fitzpatrick_scale[~light]).all()
    pd.testing.assert_frame_equal(plan, G.make_plan(tmp_path / "t.csv", cfg, 0, "img2img_ti_lora"))
    other_seed = G.make_plan(tmp_path / "t.csv", cfg, 1, "img2img_ti_lora")
    assert not plan.fitzpatrick_scale.equals(other_seed.fitzpatrick_scale)
    assert plan.prompt.tolist() == [prompts.skin_prompt(r.label, r.fitzpatrick_scale) for r in plan.itertuples()]
    plain = G.make_plan(tmp_path / "t.csv", cfg, 0, "img2img_lora")
    assert plain.prompt[0] == prompts.skin_prompt(plan.label[0], plan.fitzpatrick_scale[0], use_tokens=False)
    assert plan.seed.is_unique and plan.file.is_unique
    # Seeds are a stable hash (never Python's hash()): this value must not change between versions.
    assert G.image_seed(0, "a" * 32, 1) == int.from_bytes(hashlib.sha256(f"0:{'a' * 32}:1".encode()).digest()[:8]) >> 1


@pytest.mark.parametrize("target_per", ["source", "image"])
def test_plan_draws_the_target_skin_type_per_source_or_per_image(tmp_path, cfg, target_per):
    rows = [(f"{i:032x}", LABELS[i % 7], (1, 2, 5, 6)[i % 4]) for i in range(40)]
    pd.DataFrame(rows, columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(tmp_path / "t.csv", index=False)
    c = config.replace(cfg, generate=config.replace(cfg.generate, per_source=5, target_per=target_per))
    plan = G.make_plan(tmp_path / "t.csv", c, 0, "img2img_ti_lora")
    light = plan[plan.source_fitzpatrick_scale.isin([1, 2])]
    types_per_source = light.groupby("source_md5hash").fitzpatrick_scale.nunique()
    assert set(light.fitzpatrick_scale) == {5, 6}
    if target_per == "source":  # the authors' way: all five images of a source share one type
        assert (types_per_source == 1).all()
    else:  # 20 light sources x 5 independent draws: some source gets both types
        assert (types_per_source == 2).any()


def test_ablation_plan_keeps_the_first_sources_of_each_label(tmp_path, cfg):
    rows = [(f"{i:032x}", LABELS[i % 7], (1, 2, 5, 6)[i % 4]) for i in range(40)]
    pd.DataFrame(rows, columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(tmp_path / "t.csv", index=False)
    full = G.make_plan(tmp_path / "t.csv", cfg, 0, "img2img_ti")
    small = G.make_plan(tmp_path / "t.csv", cfg, 0, "img2img_ti", sources_per_label=2)
    per_label = small.drop_duplicates("source_md5hash").groupby("label").size()
    assert (per_label == 2).all() and len(per_label) == 7
    first_two = {h for h, _, _ in rows[:14]}  # labels cycle every 7 rows
    assert set(small.source_md5hash) == first_two
    # the same image keeps its seed (and target type) whatever the subset
    merged = small.merge(full, on="file", suffixes=("", "_full"))
    assert len(merged) == len(small) and (merged.seed == merged.seed_full).all()


@pytest.mark.parametrize("cap", [3, 8])
def test_max_per_label_caps_each_label_spreading_over_sources(tmp_path, cfg, cap):
    rows = [(f"{i:032x}", LABELS[i % 7], (1, 2, 5, 6)[i % 4]) for i in range(40)]  # 5 or 6 sources per label
    pd.DataFrame(rows, columns=["md5hash", "label", "fitzpatrick_scale"]).to_csv(tmp_path / "t.csv", index=False)
    c = config.replace(cfg, generate=config.replace(cfg.generate, per_source=2))
    full = G.make_plan(tmp_path / "t.csv", c, 0, "img2img_ti_lora")
    capped = G.make_plan(tmp_path / "t.csv", config.replace(c, generate=config.replace(c.generate, max_per_label=cap)),
                         0, "img2img_ti_lora")
    sizes = full.groupby("label").size()
    assert capped.groupby("label").size().to_dict() == sizes.clip(upper=cap).to_dict()
    if cap < sizes.min() / 2:  # fewer than one image per source: each kept image has a source of its own
        assert capped.source_md5hash.is_unique and capped.file.str.endswith("_0.png").all()
    else:  # every source's first image, then second images
        assert set(full.source_md5hash) == set(capped.source_md5hash)
    kept = full[full.file.isin(capped.file)].reset_index(drop=True)
    pd.testing.assert_frame_equal(capped, kept)  # same rows (seeds, targets, prompts), plan order kept


# --- determinism, batching, pairing ----------------------------------------------------------------


def test_same_seed_same_images_and_manifest_matches_files(ref, tmp_path, world, tiny_base, adapters, cfg):
    manifest = run(world, tiny_base, tmp_path / "again", cfg, adapters)
    assert same_bytes(ref, tmp_path / "again")
    assert (ref / "manifest.csv").read_bytes() == (tmp_path / "again" / "manifest.csv").read_bytes()
    on_disk = pd.read_csv(ref / "manifest.csv", dtype={"source_md5hash": str})
    assert list(on_disk.columns) == G.MANIFEST_COLUMNS and len(on_disk) == 8
    assert sorted(on_disk.file) == sorted(f"images/{p.name}" for p in (ref / "images").iterdir())
    assert all(Image.open(ref / f).size == (32, 32) for f in on_disk.file)
    lora_sha = hashlib.sha256((adapters / "lora" / A.LORA_FILE).read_bytes()).hexdigest()
    assert set(on_disk.lora_sha256) == {lora_sha} and on_disk.ti_sha256.str.len().eq(64).all()
    assert set(on_disk.base) == {str(tiny_base)} and set(manifest.strategy) == {"img2img_ti_lora"}


def test_batch_size_does_not_change_images(ref, tmp_path, world, tiny_base, adapters, cfg):
    one = config.replace(cfg, generate=config.replace(cfg.generate, batch_size=1))
    run(world, tiny_base, tmp_path / "b1", one, adapters)
    a, b = pixels(ref), pixels(tmp_path / "b1")
    assert a.keys() == b.keys()
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 2


def test_each_batch_element_gets_its_own_source_prompt_and_seed(monkeypatch, tmp_path, world, tiny_base, cfg):
    from diffusers import StableDiffusionImg2ImgPipeline

    calls, call = [], StableDiffusionImg2ImgPipeline.__call__

    def spy(self, **kw):
        calls.append(kw)
        return call(self, **kw)

    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, "__call__", spy)
    manifest = run(world, tiny_base, tmp_path / "out", cfg, strategy="img2img_vanilla")
    assert [len(c["prompt"]) for c in calls] == [4, 4]
    rows = iter(manifest.itertuples())
    for kw in calls:
        assert kw["num_images_per_prompt"] == 1
        for image, prompt, gen in zip(kw["image"], kw["prompt"], kw["generator"], strict=True):
            row = next(rows)
            source = trainset.open_image(world / "images" / f"{row.source_md5hash}.jpg", 32)
            assert np.array_equal(np.asarray(image), np.asarray(source))
            assert prompt == row.prompt and gen.initial_seed() == row.seed
            assert prompt == prompts.skin_prompt(row.label, row.fitzpatrick_scale, use_tokens=False)


# --- resume ----------------------------------------------------------------------------------------


def test_interrupted_run_resumes_without_duplicates_or_gaps(ref, monkeypatch, tmp_path, world, tiny_base,
                                                            adapters, cfg, capsys):
    out, synthesize, calls = tmp_path / "syn", G.synthesize, []

    def dies_after_one_batch(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return synthesize(*args)

    monkeypatch.setattr(G, "synthesize", dies_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(world, tiny_base, out, cfg, adapters)
    assert len(list((out / "images").iterdir())) == 4 and not (out / "manifest.csv").exists()
    monkeypatch.setattr(G, "synthesize", synthesize)
    first = sorted((out / "images").iterdir())
    first[0].write_bytes(b"half a png")  # damaged image: remade
    (out / "images" / ".x.png.tmp.png").write_bytes(b"")  # leftover of a killed write: removed
    capsys.readouterr()
    run(world, tiny_base, out, cfg, adapters)
    assert "8 images (5 new)" in capsys.readouterr().out
    assert same_bytes(ref, out)
    assert (ref / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()


def test_a_batch_cut_short_is_made_again_whole(ref, monkeypatch, tmp_path, world, tiny_base, adapters, cfg):
    """A kill between two images of one batch: the rerun computes that batch with all its rows (so
    each image comes from the batch it always does, which on a GPU decides its last bits) and
    writes only the missing images."""
    out = tmp_path / "syn"
    shutil.copytree(ref, out)
    (out / "manifest.csv").unlink()
    names = sorted(p.name for p in (out / "images").iterdir())[:4]  # make_plan order: the first batch of 4
    first_batch = sorted(G.make_plan(world / "train.csv", cfg, 0, "img2img_ti_lora").file[:4])
    assert [f"images/{n}" for n in names] == first_batch
    kept = {n: (out / "images" / n).stat().st_ino for n in names[:2]}
    for name in names[2:]:
        (out / "images" / name).unlink()
    calls, synthesize = [], G.synthesize
    monkeypatch.setattr(G, "synthesize", lambda pipe, s, rows, *a: calls.append([r["file"] for r in rows])
                        or synthesize(pipe, s, rows, *a))
    run(world, tiny_base, out, cfg, adapters)
    assert calls == [first_batch]
    assert {n: (out / "images" / n).stat().st_ino for n in names[:2]} == kept  # not written again
    assert same_bytes(ref, out)


def test_changed_settings_start_over(ref, tmp_path, world, tiny_base, adapters, cfg, capsys):
    out = tmp_path / "syn"
    shutil.copytree(ref, out)
    other = config.replace(cfg, generate=config.replace(cfg.generate, guidance=3.0))
    run(world, tiny_base, out, other, adapters)
    assert "8 images (8 new)" in capsys.readouterr().out
    assert not any(np.array_equal(a, b) for a, b in zip(pixels(ref).values(), pixels(out).values()))
    run(world, tiny_base, out, other, adapters)  # unchanged: nothing to do
    assert "8 images (0 new)" in capsys.readouterr().out


# --- processes ---------------------------------------------------------------------------------------


class ThreadState:
    """accelerate's PartialState as generate() uses it, for processes played by threads."""

    def __init__(self, index: int, barrier: threading.Barrier):
        self.process_index = self.local_process_index = index
        self.num_processes = barrier.parties
        self.is_main_process = index == 0
        self._barrier = barrier

    def wait_for_everyone(self):
        self._barrier.wait()


def test_two_processes_make_what_one_makes(ref, monkeypatch, tmp_path, world, tiny_base, adapters, cfg):
    barrier, errors, lock, load = threading.Barrier(2, timeout=120), [], threading.Lock(), G.load_pipeline

    def load_one_at_a_time(*args):  # model loading patches torch globally (meta device): not thread-safe
        with lock:
            return load(*args)

    monkeypatch.setattr(G, "load_pipeline", load_one_at_a_time)

    def process(i):
        try:
            run(world, tiny_base, tmp_path / "syn", cfg, adapters, state=ThreadState(i, barrier))
        except BaseException as e:  # noqa: BLE001 - surface it in the test thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert same_bytes(ref, tmp_path / "syn")
    assert (ref / "manifest.csv").read_bytes() == (tmp_path / "syn" / "manifest.csv").read_bytes()


@pytest.mark.slow
def test_accelerate_launch_two_processes(ref, tmp_path, world, tiny_base, adapters, cfg):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): same images and manifest as one process."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    (tmp_path / "split").mkdir()
    shutil.copy(world / "train.csv", tmp_path / "split" / "train.csv")
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(bin_dir / "skinaug"), "--params", str(params),
           "generate", str(tmp_path / "split"), str(world / "images"), str(tiny_base), str(tmp_path / "syn"),
           "--ti-dir", str(adapters / "ti"), "--lora-dir", str(adapters / "lora"), "--seed", "0"]
    # Same thread count as the reference run: CPU kernels sum in another order with other counts.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "SKINAUG_TEST_THREADS": threads, "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("generate: 8 images (8 new)") == 1  # one summary: from process 0
    assert "4/4 [" in done.stderr and "8/8 [" not in done.stderr  # process 0 made half the images
    assert same_bytes(ref, tmp_path / "syn")
    assert (ref / "manifest.csv").read_bytes() == (tmp_path / "syn" / "manifest.csv").read_bytes()


@pytest.mark.slow
def test_two_runs_on_one_output_take_turns(ref, tmp_path, world, tiny_base, adapters, cfg):
    """Two `skinaug generate` processes on one out_dir (two `dvc exp` workers, say): the second waits
    for the first's lock instead of deleting its temp files as leftovers, then finds every image
    made; the folder holds one run's images and manifest, and nothing else."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    (tmp_path / "split").mkdir()
    shutil.copy(world / "train.csv", tmp_path / "split" / "train.csv")
    out = tmp_path / "out" / "syn"
    cmd = [str(Path(sys.executable).parent / "skinaug"), "--params", str(params), "generate", str(tmp_path / "split"),
           str(world / "images"), str(tiny_base), str(out), "--ti-dir", str(adapters / "ti"), "--lora-dir",
           str(adapters / "lora"), "--seed", "0"]
    # Same thread count as the reference run: CPU kernels sum in another order with other counts.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": ""}
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    runs = start_two_waiting(cmd, env, out, logs)
    for proc, log in zip(runs, logs):
        assert proc.wait(timeout=300) == 0, log.read_text()
    said = sorted(re.search(r"generate: 8 images \((\d) new\)", log.read_text()).group(1) for log in logs)
    assert said == ["0", "8"]
    assert same_bytes(ref, out)
    assert (ref / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["syn"]


# --- adapters and strategies ------------------------------------------------------------------------


def test_adapters_load_with_the_stock_loaders(world, tiny_base, adapters, cfg):
    plan = G.make_plan(world / "train.csv", cfg, 0, "img2img_ti_lora")
    tokens = G.tokens_for(plan, adapters / "ti", tiny_base)
    assert sorted(tokens) == sorted(prompts.token(label) for _, label, _ in SOURCES)
    loras = G.loras_for(plan, adapters / "lora", "joint", tiny_base)
    pipe = G.load_pipeline(tiny_base, G.STRATEGIES["img2img_ti_lora"], tokens, loras, cfg, torch.device("cpu"))
    from safetensors.torch import load_file

    table = pipe.text_encoder.get_input_embeddings().weight
    for tok, path in tokens.items():
        (token_id,) = pipe.tokenizer(tok, add_special_tokens=False).input_ids
        assert torch.equal(table[token_id], load_file(path)[tok][0])
    assert pipe.get_list_adapters() == {"unet": ["joint"]}
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_lora_changes_the_output(ref, tmp_path, world, tiny_base, adapters, cfg):
    manifest = run(world, tiny_base, tmp_path / "ti", cfg, adapters, strategy="img2img_ti")
    assert set(manifest.lora_sha256) == {""} and manifest.prompt.equals(pd.read_csv(ref / "manifest.csv").prompt)
    a, b = pixels(ref), pixels(tmp_path / "ti")
    assert min(np.abs(a[k] - b[k]).mean() for k in a) > 1


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on a second adapter
def test_per_label_lora_switches_adapter_per_batch(ref, tmp_path, world, tiny_base, adapters, cfg):
    per_label = tmp_path / "lora"
    for md5hash, label, _ in SOURCES:  # every label gets the joint LoRA, except the first: another one
        source = adapters / ("other_lora" if md5hash == SOURCES[0][0] else "lora") / A.LORA_FILE
        (per_label / A.name(label)).mkdir(parents=True)
        shutil.copy(source, per_label / A.name(label) / A.LORA_FILE)
    pl_cfg = config.replace(cfg, lora=config.replace(cfg.lora, mode="per_label"))
    run(world, tiny_base, tmp_path / "syn", pl_cfg, adapters, lora_dir=per_label)
    a, b = pixels(ref), pixels(tmp_path / "syn")
    for name in a:
        diff = np.abs(a[name] - b[name])
        assert diff.mean() > 1 if name.startswith(SOURCES[0][0]) else diff.max() <= 2


def test_txt2img_strategy(tmp_path, world, tiny_base, adapters, cfg):
    manifest = run(world, tiny_base, tmp_path / "syn", cfg, adapters, strategy="txt2img_ti")
    on_disk = pd.read_csv(tmp_path / "syn" / "manifest.csv")
    assert on_disk.strength.isna().all() and set(manifest.lora_sha256) == {""}
    assert len(list((tmp_path / "syn" / "images").iterdir())) == 8


@pytest.mark.parametrize("strategy, ti, lora, option", [
    ("img2img_ti_lora", False, True, "--ti-dir"), ("img2img_ti_lora", True, False, "--lora-dir"),
    ("img2img_lora", False, False, "--lora-dir"), ("txt2img_ti", False, False, "--ti-dir"),
])
def test_strategies_need_their_dirs(tmp_path, world, tiny_base, adapters, cfg, strategy, ti, lora, option):
    with pytest.raises(SkinaugError, match=f"needs {option}"):
        run(world, tiny_base, tmp_path / "syn", cfg, strategy=strategy,
            ti_dir=adapters / "ti" if ti else None, lora_dir=adapters / "lora" if lora else None)
    assert not (tmp_path / "syn").exists()


def _lora_made(tmp_path: Path, adapters: Path, name: str, tokens: bool | None) -> Path:
    """A copy of the test LoRA whose lora.json says how it was trained (None: no lora.json)."""
    folder = tmp_path / name
    shutil.copytree(adapters / "lora", folder)
    if tokens is not None:
        (folder / "lora.json").write_text(json.dumps({"tokens": tokens}))
    return folder


def test_each_lora_strategy_takes_the_lora_trained_its_way(tmp_path, adapters):
    with_tokens = _lora_made(tmp_path, adapters, "lora", True)
    plain = _lora_made(tmp_path, adapters, "lora_plain", False)
    assert G.choose_lora([with_tokens, plain], "img2img_ti_lora") == with_tokens  # the method
    assert G.choose_lora([with_tokens, plain], "img2img_lora") == plain
    assert G.choose_lora([_lora_made(tmp_path, adapters, "made_elsewhere", None)], "img2img_lora").name == "made_elsewhere"
    with pytest.raises(SkinaugError, match="img2img_ti_lora needs one LoRA trained with the learned tokens"):
        G.choose_lora([plain], "img2img_ti_lora")  # TI tokens on a plain-name LoRA: not the method
    with pytest.raises(SkinaugError, match="img2img_lora needs one LoRA trained on plain condition names"):
        G.choose_lora([with_tokens], "img2img_lora")


def test_the_manifest_records_the_lora_each_strategy_used(tmp_path, world, tiny_base, adapters, cfg):
    with_tokens = _lora_made(tmp_path, adapters, "lora", True)
    plain = _lora_made(tmp_path, adapters, "lora_plain", False)
    shutil.copy(adapters / "other_lora" / A.LORA_FILE, plain / A.LORA_FILE)
    c = config.replace(cfg, generate=config.replace(cfg.generate, per_source=1, steps=2))
    hashes = {}
    for strategy in ("img2img_ti_lora", "img2img_lora"):
        manifest = run(world, tiny_base, tmp_path / strategy, c, adapters, strategy=strategy,
                       lora_dir=[with_tokens, plain])
        hashes[strategy] = set(manifest.lora_sha256)
    assert hashes["img2img_ti_lora"] == {hashlib.sha256((with_tokens / A.LORA_FILE).read_bytes()).hexdigest()}
    assert hashes["img2img_lora"] == {hashlib.sha256((plain / A.LORA_FILE).read_bytes()).hexdigest()}


# --- bad input: one clear line, nothing written ----------------------------------------------------


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, world, tiny_base, adapters, cfg):
    bad = tmp_path / "world"
    shutil.copytree(world, bad)
    out = tmp_path / "syn"
    with pytest.raises(SkinaugError, match="unknown generation strategy"):
        run(bad, tiny_base, out, cfg, adapters, strategy="img2img_magic")
    with pytest.raises(SkinaugError, match="cannot load base model"):
        run(bad, tmp_path / "no_base", out, cfg, adapters)
    shutil.copytree(adapters / "ti", tmp_path / "ti")
    (tmp_path / "ti" / "bas-class.safetensors").unlink()
    with pytest.raises(SkinaugError, match="no token file for <bas-class>"):
        run(bad, tiny_base, out, cfg, adapters, ti_dir=tmp_path / "ti")
    with pytest.raises(SkinaugError, match="LoRA weights not found"):
        run(bad, tiny_base, out, cfg, adapters, lora_dir=tmp_path)
    (bad / "images" / f"{SOURCES[1][0]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SkinaugError, match=f"cannot read training image .*{SOURCES[1][0]}.jpg"):
        run(bad, tiny_base, out, cfg, adapters)
    for md5hash, _, _ in SOURCES[2:]:
        (bad / "images" / f"{md5hash}.jpg").unlink()
    with pytest.raises(SkinaugError, match=f"2 of 4 training images missing, first .*{SOURCES[2][0]}.jpg"):
        run(bad, tiny_base, out, cfg, adapters)
    assert not out.exists()


def _bad_adapter(adapters: Path, tmp_path: Path, which: str) -> tuple[Path, Path, str]:
    """Copies of ti/ and lora/, one file as if made for a base with a 768-wide text encoder (SD 1.x): a token
    of that width, or a LoRA whose cross-attention reads it."""
    from safetensors.torch import load_file, save_file

    ti, lora = shutil.copytree(adapters / "ti", tmp_path / "ti"), shutil.copytree(adapters / "lora", tmp_path / "lora")
    if which == "token":
        bad = ti / "bas-class.safetensors"
        save_file({"<bas-class>": torch.zeros(1, 768)}, bad)
        return ti, lora, f"token file {bad} holds a 1 x 768 tensor"
    bad = lora / A.LORA_FILE
    weights = load_file(bad)
    key = next(k for k in weights if k.endswith("attn2.to_k.lora.down.weight"))
    save_file({**weights, key: torch.zeros(weights[key].shape[0], 768)}, bad)
    return ti, lora, f"LoRA {bad} does not fit the UNet"


@pytest.mark.parametrize("which", ["token", "lora"])
def test_cli_refuses_an_adapter_for_another_base_in_one_line_and_writes_nothing(tmp_path, world, tiny_base, adapters,
                                                                               which):
    from click.testing import CliRunner

    from skinaug import cli

    ti, lora, named = _bad_adapter(adapters, tmp_path, which)
    params = Path(shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml"))
    out = tmp_path / "syn"
    result = CliRunner().invoke(cli.main, ["--params", str(params), "generate", str(world), str(world / "images"),
                                           str(tiny_base), str(out), "--ti-dir", str(ti), "--lora-dir", str(lora),
                                           "--strategy", "img2img_ti_lora", "--seed", "0"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("free_gib", "dtype", "resolution", "expected"), [
    (23, torch.float16, 512, 27),  # a 24 GB card: 0.9 x 23 // 0.75
    (23, torch.float32, 512, 13),  # fp32 doubles the per-image memory
    (23, torch.float16, 256, 64),  # a quarter of the pixels: 110, capped
    (139, torch.bfloat16, 512, 64),  # an H200: the cap
    (0.5, torch.float16, 512, 1),  # never fewer than one
])
def test_batch_size_zero_fits_free_gpu_memory(repo_cfg, monkeypatch, free_gib, dtype, resolution, expected):
    from skinaug.diffusion import generate

    c = dataclasses.replace(repo_cfg, model=dataclasses.replace(repo_cfg.model, resolution=resolution),
                            generate=dataclasses.replace(repo_cfg.generate, batch_size=0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free_gib * 2**30), 0))
    assert generate.batch_size(c, torch.device("cuda", 0), dtype) == expected
    assert generate.batch_size(c, torch.device("cpu"), torch.float32) == generate.CPU_BATCH
