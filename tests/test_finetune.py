"""Textual inversion and LoRA on the tiny base model: what changes, what loads, what resumes, what fails."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from skinaug import SkinaugError, prompts
from skinaug.diffusion import adapters, finetune

LABELS = ["basal cell carcinoma", "folliculitis"]
FSTS = [1, 2, 2, 6]  # per label: light types dominate, as in the study


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A train.csv of 2 labels x 4 images (32 px squares, one 32x40 to exercise LoRA's random crop)."""
    root = tmp_path_factory.mktemp("split")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for k, label in enumerate(LABELS):
        for i, fst in enumerate(FSTS):
            md5 = f"{k}{i}".ljust(32, "0")
            size = (32, 40) if (k, i) == (0, 0) else (32, 32)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{md5}.jpg")
            rows.append({"md5hash": md5, "fitzpatrick_scale": fst, "label": label})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    return root / "train.csv", images


@pytest.fixture(scope="module")
def cfg(repo_cfg):
    """The demo profile's settings, shrunk: 2 labels, 16 px, 3 steps, small batches."""
    return dataclasses.replace(
        repo_cfg,
        subset=dataclasses.replace(repo_cfg.subset, labels=LABELS),
        model=dataclasses.replace(repo_cfg.model, resolution=16, mixed_precision="no", device="cpu"),
        textual_inversion=dataclasses.replace(repo_cfg.textual_inversion, steps=3, batch_size=1, grad_accum=2,
                                              lr=5.0e-3, scale_lr=False, log_every=2),
        lora=dataclasses.replace(repo_cfg.lora, steps=3, batch_size=2, lr=1.0e-3, log_every=2),
    )


@pytest.fixture(scope="module")
def ti_run(split, tiny_base, cfg, tmp_path_factory):
    """One joint run of the tokens; records the whole embedding matrix and the losses after every
    update; its DVCLive curve is in out's sibling folder live/."""
    out = tmp_path_factory.mktemp("ti") / "ti"
    matrices, losses = [], []

    def record(step, step_losses, text_encoder):
        matrices.append(text_encoder.get_input_embeddings().weight.detach().clone())
        losses.append(step_losses)

    finetune.train_textual_inversion(*split, tiny_base, out, cfg, seed=7, on_step=record, live_dir=out.parent / "live")
    ti_losses[out] = losses
    return out, matrices


@pytest.fixture(scope="module")
def lora_run(split, tiny_base, cfg, ti_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "lora"
    finetune.train_lora(*split, tiny_base, ti_run[0], out, cfg, seed=7, live_dir=out.parent / "live")
    return out


ti_losses = {}  # ti_run's per-update losses, by its output folder


def read_live(live_dir: Path) -> dict[str, pd.DataFrame]:
    metrics = Path(live_dir) / "plots" / "metrics"
    return {str(p.relative_to(metrics).with_suffix("")): pd.read_csv(p, sep="\t") for p in sorted(metrics.rglob("*.tsv"))}


def live_bytes(live_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(live_dir)): p.read_bytes() for p in sorted(Path(live_dir).rglob("*")) if p.is_file()}


def test_ti_logs_each_token_s_mean_loss_every_log_every_updates_and_the_last(ti_run, cfg):
    out = ti_run[0]
    live = read_live(out.parent / "live")
    tokens = [prompts.token(label).strip("<>") for label in LABELS]
    assert sorted(live) == sorted(f"loss/{t}" for t in tokens)
    losses = ti_losses[out]  # 3 updates, log_every 2: rows at 2 (mean of 1-2) and 3 (the last, alone)
    for label, token in zip(LABELS, tokens):
        curve = live[f"loss/{token}"]
        assert curve.step.tolist() == [2, 3]
        expected = [np.mean([losses[0][label], losses[1][label]]), losses[2][label]]
        assert curve[token].tolist() == pytest.approx(expected, rel=1e-12)
    summary = json.loads((out.parent / "live" / "metrics.json").read_text())
    assert summary["step"] == 3 and set(summary["loss"]) == set(tokens)
    assert sorted(p.name for p in (out.parent / "live").iterdir()) == ["metrics.json", "plots"]


def test_lora_logs_its_loss_curve(lora_run):
    live = read_live(lora_run.parent / "live")
    assert list(live) == ["loss/joint"] and live["loss/joint"].step.tolist() == [2, 3]
    assert np.isfinite(live["loss/joint"].joint).all()


def _vectors(ti_dir):
    return {p.stem: load_file(p) for p in sorted(ti_dir.glob("*.safetensors"))}


def test_ti_learns_only_the_new_rows(ti_run, tiny_base):
    from transformers import CLIPTextModel, CLIPTokenizer

    out, matrices = ti_run
    base = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder").get_input_embeddings().weight
    skin = base[CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer").encode(
        "skin", add_special_tokens=False)[0]]
    assert len(matrices) == 3
    for matrix in matrices:  # after every update, every old row is the base model's, bit for bit
        assert torch.equal(matrix[: len(base)], base)
    new_rows = matrices[-1][len(base):]
    assert new_rows.shape[0] == len(LABELS)
    assert all(not torch.allclose(row, skin) for row in new_rows)
    summary = json.loads((out / "ti.json").read_text())
    assert set(summary["tokens"]) == set(LABELS) and summary["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["bas-class.safetensors", "fol-class.safetensors", "ti.json"]
    assert not list(out.parent.glob(".*"))  # no work folder left behind


def test_joint_ti_equals_separate_runs(ti_run, split, tiny_base, cfg, tmp_path):
    joint = _vectors(ti_run[0])
    label = LABELS[1]  # the second token alone: its seeds must not depend on the others
    finetune.train_textual_inversion(*split, tiny_base, tmp_path / "alone", cfg, seed=7, labels=[label])
    (name, alone), = _vectors(tmp_path / "alone").items()
    token = prompts.token(label)
    torch.testing.assert_close(alone[token], joint[name][token], atol=1e-5, rtol=0)
    assert not torch.allclose(joint[name][token], joint["bas-class"]["<bas-class>"])


def test_one_token_per_forward_pass_changes_nothing(ti_run, split, tiny_base, cfg, tmp_path):
    """textual_inversion.tokens_per_pass (less GPU memory) splits the joint batch; the result stays."""
    one_per_pass = dataclasses.replace(cfg, textual_inversion=dataclasses.replace(cfg.textual_inversion,
                                                                                   tokens_per_pass=1))
    finetune.train_textual_inversion(*split, tiny_base, tmp_path / "ti", one_per_pass, seed=7)
    split_passes, joint = _vectors(tmp_path / "ti"), _vectors(ti_run[0])
    for name in joint:
        torch.testing.assert_close(split_passes[name], joint[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("free_gib", "precision", "processes", "setting", "expected"), [
    (139, "bf16", 1, 0, 7),  # an H200: all seven, as the GPU check ran them (25.4 GB)
    (23, "fp16", 1, 0, 5),  # a 24 GB card: (0.9 x 23 - 4) // (0.7 x 4) = 5
    (14, "fp16", 1, 0, 3),  # a 16 GB card
    (23, "no", 1, 0, 2),  # fp32 doubles the per-image memory
    (5, "fp16", 1, 0, 1),  # never fewer than one
    (23, "fp16", 1, 6, 6),  # a setting is honoured whatever the memory
    (5, "fp16", 2, 0, 7),  # several processes: each holds only its share of a pass
])
def test_tokens_per_pass_zero_fits_free_gpu_memory(repo_cfg, monkeypatch, free_gib, precision, processes, setting,
                                                    expected):
    """textual_inversion.tokens_per_pass 0 sizes the pass from free memory on one GPU (512 px, batch 4)."""
    c = dataclasses.replace(repo_cfg, model=dataclasses.replace(repo_cfg.model, resolution=512),
                            textual_inversion=dataclasses.replace(repo_cfg.textual_inversion, batch_size=4,
                                                                  tokens_per_pass=setting))
    accelerator = SimpleNamespace(device=torch.device("cuda", 0), num_processes=processes, mixed_precision=precision)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free_gib * 2**30), 0))
    assert finetune.tokens_per_pass(c, accelerator, 7) == expected


def test_tokens_per_pass_zero_is_every_token_on_a_cpu(repo_cfg):
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, mixed_precision="no")
    assert finetune.tokens_per_pass(repo_cfg, accelerator, 7) == 7


@pytest.mark.parametrize("templates", ["authors", "imagenet"])
def test_ti_prompts_come_from_the_chosen_templates(split, tiny_base, cfg, tmp_path, monkeypatch, templates):
    """The authors' 11 neutral templates by default; never "a dark photo of the" unless asked for."""
    from skinaug.diffusion import training

    seen, encode = [], training.encode_prompts
    monkeypatch.setattr(training, "encode_prompts", lambda tok, te, texts: seen.extend(texts) or encode(tok, te, texts))
    c = dataclasses.replace(cfg, textual_inversion=dataclasses.replace(cfg.textual_inversion, steps=20,
                                                                        templates=templates))
    finetune.train_textual_inversion(*split, tiny_base, tmp_path / "ti", c, seed=7)
    allowed = {t.format(prompts.token(label)) for t in prompts.TI_TEMPLATES[templates] for label in LABELS}
    assert len(seen) == 20 * 2 * 2 and set(seen) <= allowed  # steps x grad_accum x tokens
    assert len(prompts.TI_TEMPLATES["authors"]) == 11
    assert not any("dark" in t or "bright" in t for t in prompts.TI_TEMPLATES["authors"])
    if templates == "imagenet":
        assert len(set(seen)) > 11  # 80 draws from 54 prompts reach beyond the authors' 22


def test_token_files_load_with_the_stock_loader(ti_run, tiny_base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    files, tokens = adapters.token_files(ti_run[0], LABELS)
    for file, token in zip(files, tokens):
        pipe.load_textual_inversion(str(file), token=token)
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(token)]
        assert torch.equal(row, load_file(file)[token][0])
    ids = pipe.tokenizer(prompts.skin_prompt("folliculitis", 5)).input_ids
    assert pipe.tokenizer.convert_tokens_to_ids("<fol-class>") in ids


def test_lora_trains_and_loads_into_a_stock_img2img_pipeline(lora_run, ti_run, tiny_base):
    from diffusers import StableDiffusionImg2ImgPipeline

    weights = load_file(lora_run / adapters.LORA_FILE)
    ups = [v for k, v in weights.items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # lora_B starts at zero: it learned
    summary = json.loads((lora_run / "lora.json").read_text())
    assert summary["tokens"] is True and summary["mode"] == "joint"
    assert summary["latents_kept"].startswith(f"{len(LABELS) * len(FSTS) - 1} of")

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipe.load_textual_inversion([str(f) for f in adapters.token_files(ti_run[0], LABELS)[0]],
                                token=[prompts.token(label) for label in LABELS])
    pipe.load_lora_weights(lora_run)
    assert pipe.get_active_adapters()
    source = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    image = pipe(prompts.skin_prompt("folliculitis", 6), image=source, strength=0.5, num_inference_steps=4,
                 guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()


def test_lora_clips_gradients_only_when_max_grad_norm_is_set(split, tiny_base, cfg, tmp_path, monkeypatch):
    """lora.max_grad_norm 0 (the paper profile) runs as the reference script does: no clipping."""
    from accelerate import Accelerator

    norms, clip = [], Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_",
                        lambda self, params, norm, *a, **k: norms.append(norm) or clip(self, params, norm, *a, **k))
    weights = {}
    for norm in (0.0, 1.0e-6):
        c = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, max_grad_norm=norm))
        finetune.train_lora(*split, tiny_base, None, tmp_path / str(norm), c, seed=7)
        weights[norm] = load_file(tmp_path / str(norm) / adapters.LORA_FILE)
    assert norms == [1.0e-6] * cfg.lora.steps
    assert any(not torch.equal(weights[0.0][k], weights[1.0e-6][k]) for k in weights[0.0])


def test_per_label_lora_without_tokens_writes_one_lora_per_label(split, tiny_base, cfg, tmp_path):
    per_label = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, mode="per_label", steps=2))
    calls = []

    def stop_in_the_second_lora(step, *_):
        calls.append(step)
        if len(calls) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        finetune.train_lora(*split, tiny_base, None, tmp_path / "lora", per_label, seed=0, checkpoint_every=1,
                            on_step=stop_in_the_second_lora, live_dir=tmp_path / "live")
    calls.clear()
    finetune.train_lora(*split, tiny_base, None, tmp_path / "lora", per_label, seed=0,
                        on_step=lambda step, *_: calls.append(step), live_dir=tmp_path / "live")
    assert calls == [2]  # the first LoRA was done, the second resumed after its first update
    live = read_live(tmp_path / "live")  # each LoRA's curve once: the finished one's replayed from the checkpoint
    assert sorted(live) == sorted(f"loss/{prompts.token(label).strip('<>')}" for label in LABELS)
    assert all(curve.step.tolist() == [2] for curve in live.values())
    files = adapters.trained_loras(tmp_path / "lora")
    assert set(files) == {prompts.token(label).strip("<>") for label in LABELS}
    for name, file in files.items():
        assert file == tmp_path / "lora" / name / adapters.LORA_FILE
        assert file.is_file()
    assert json.loads((tmp_path / "lora" / "lora.json").read_text())["tokens"] is False


def test_balanced_sampler_draws_skin_types_evenly():
    fst = np.array([2] * 90 + [1] * 8 + [6] * 2)
    drawn = fst[finetune.balanced_indices(fst, 3000, torch.Generator().manual_seed(0))]
    counts = np.array([(drawn == t).sum() for t in (1, 2, 6)])
    assert np.all(np.abs(counts - 1000) < 100), counts


class _Stop(Exception):
    pass


def _stop_at(step):
    def on_step(s, *_):
        if s == step:
            raise _Stop

    return on_step


def test_interrupted_ti_resumes_to_the_uninterrupted_result(ti_run, split, tiny_base, cfg, tmp_path):
    out = tmp_path / "ti"
    with pytest.raises(_Stop):  # after the last update's loss row reached DVCLive; the checkpoint is update 2's
        finetune.train_textual_inversion(*split, tiny_base, out, cfg, seed=7, checkpoint_every=1,
                                         on_step=_stop_at(3), live_dir=tmp_path / "live")
    assert not out.exists() and (tmp_path / ".ti.partial" / "checkpoint.pt").is_file()
    steps = []
    finetune.train_textual_inversion(*split, tiny_base, out, cfg, seed=7, on_step=lambda s, *_: steps.append(s),
                                     live_dir=tmp_path / "live")
    assert steps == [3]  # only the last update was left
    resumed, whole = _vectors(out), _vectors(ti_run[0])
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=0, rtol=0)
    assert live_bytes(tmp_path / "live") == live_bytes(ti_run[0].parent / "live")  # no row lost or repeated


def test_interrupted_lora_resumes_to_the_uninterrupted_result(lora_run, ti_run, split, tiny_base, cfg, tmp_path):
    out = tmp_path / "lora"
    with pytest.raises(_Stop):
        finetune.train_lora(*split, tiny_base, ti_run[0], out, cfg, seed=7, checkpoint_every=1, on_step=_stop_at(2),
                            live_dir=tmp_path / "live")
    assert not out.exists()
    finetune.train_lora(*split, tiny_base, ti_run[0], out, cfg, seed=7, live_dir=tmp_path / "live")
    assert live_bytes(tmp_path / "live") == live_bytes(lora_run.parent / "live")
    resumed, whole = load_file(out / adapters.LORA_FILE), load_file(lora_run / adapters.LORA_FILE)
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=0, rtol=0)
    # the very bytes: safetensors writes its metadata in hash-map order unless the header is sorted
    assert (out / adapters.LORA_FILE).read_bytes() == (lora_run / adapters.LORA_FILE).read_bytes()
    assert (out / "lora.json").read_bytes() == (lora_run / "lora.json").read_bytes()


def test_sorted_metadata_makes_safetensors_files_reproducible(tmp_path):
    """safetensors writes a file's __metadata__ in hash-map order, another in each process (the
    LoRA file has two keys): with the keys sorted, the same tensors give the same bytes."""
    from safetensors import safe_open

    script = ("import json, sys, numpy as np; from safetensors.numpy import save_file; "
              "save_file({'w': np.arange(3.0)}, sys.argv[1], metadata=json.loads(sys.argv[2]))")
    metadata = {"format": "pt", "lora_adapter_metadata": '{\n "r": 8}', "x": "é"}
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for file in files:
        subprocess.run([sys.executable, "-c", script, str(file), json.dumps(metadata)], check=True)
    for file in files:
        finetune._sort_metadata(file)
    assert len({file.read_bytes() for file in files}) == 1
    with safe_open(str(files[0]), "np") as f:
        assert f.metadata() == metadata
        assert f.get_tensor("w").tolist() == [0.0, 1.0, 2.0]


def _broken(split, tmp_path, how):
    """A copy of the split with its images broken in one way."""
    train_csv, images = split
    copy = tmp_path / "images"
    copy.mkdir()
    df = pd.read_csv(train_csv, dtype={"md5hash": str})
    for md5 in df.md5hash:
        (copy / f"{md5}.jpg").write_bytes((images / f"{md5}.jpg").read_bytes())
    if how == "missing":
        for md5 in df.md5hash[3:5]:
            (copy / f"{md5}.jpg").unlink()
    if how == "corrupt":
        (copy / f"{df.md5hash[4]}.jpg").write_bytes(b"not a jpeg")
    return train_csv, copy, copy / f"{df.md5hash[3 if how == 'missing' else 4]}.jpg"


@pytest.mark.parametrize("stage", ["textual_inversion", "lora"])
@pytest.mark.parametrize("how", ["no_base", "missing", "corrupt"])
def test_bad_input_is_one_clear_error_and_leaves_nothing(stage, how, split, tiny_base, cfg, tmp_path):
    train_csv, images, culprit = _broken(split, tmp_path, how)
    base = tmp_path / "no-such-base" if how == "no_base" else tiny_base
    out = tmp_path / "out"
    with pytest.raises(SkinaugError) as err:
        if stage == "textual_inversion":
            finetune.train_textual_inversion(train_csv, images, base, out, cfg, seed=0)
        else:
            finetune.train_lora(train_csv, images, base, None, out, cfg, seed=0)
    message = str(err.value)
    assert "\n" not in message
    expected = {"no_base": ["no-such-base", "no such folder"], "missing": ["2 of 8", str(culprit)],
                "corrupt": [str(culprit)]}[how]
    assert all(part in message for part in expected), message
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_lora_refuses_learned_tokens_that_do_not_fit_the_base(split, tiny_base, cfg, tmp_path):
    """Several vectors in one token file: diffusers' loader would make it several tokens without a word."""
    from safetensors.torch import save_file

    ti = tmp_path / "ti"
    ti.mkdir()
    for label in LABELS:
        token = prompts.token(label)
        save_file({token: torch.zeros(3 if label == LABELS[1] else 1, 32)}, ti / f"{token.strip('<>')}.safetensors")
    bad = ti / f"{prompts.token(LABELS[1]).strip('<>')}.safetensors"
    with pytest.raises(SkinaugError) as err:
        finetune.train_lora(*split, tiny_base, ti, tmp_path / "out", cfg, seed=0)
    assert str(err.value).startswith(f"token file {bad} holds a 3 x 32 tensor") and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("count", [1, 3, 8])
def test_each_sample_of_a_batch_is_one_process_s(count):
    from types import SimpleNamespace

    shares = [finetune._mine(count, SimpleNamespace(num_processes=3, process_index=i)) for i in range(3)]
    assert [j for share in shares for j in share] == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.slow
def test_two_processes_train_as_one(split, tiny_base, cfg, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the tokens and LoRA of one process.

    Odd batches split unevenly (1 + 2 samples per token and per LoRA step), so each token's batch
    is shared by both processes. About 50 s on 2 CPU cores (mostly the two launches' start-up).
    """
    two = dataclasses.replace(
        cfg, textual_inversion=dataclasses.replace(cfg.textual_inversion, steps=2, batch_size=3, grad_accum=1,
                                                   tokens_per_pass=1),
        lora=dataclasses.replace(cfg.lora, steps=2, batch_size=3))
    one = tmp_path / "one"
    finetune.train_textual_inversion(*split, tiny_base, one / "ti", two, seed=3)
    finetune.train_lora(*split, tiny_base, one / "ti", one / "lora", two, seed=3)

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dataclasses.asdict(two)))
    bin_dir = Path(sys.executable).parent
    launch = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(bin_dir / "skinaug"), "--params", str(params)]
    args = [str(split[0].parent), str(split[1]), str(tiny_base)]
    multi = tmp_path / "multi"
    # Same thread count as the one-process run: CPU kernels sum in another order with other counts.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    for stage, out, extra in (("textual_inversion", "ti", []), ("lora", "lora", ["--ti-dir", str(one / "ti")])):
        done = subprocess.run([*launch, stage, *args, str(multi / out), *extra, "--seed", "3"],
                              check=False, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(f"{stage}: ") == 1, done.stdout  # one summary: the main process's

    assert sorted(p.name for p in multi.iterdir()) == ["lora", "ti"]  # no partial or old folders
    for out in ("ti", "lora"):
        assert sorted(p.name for p in (multi / out).iterdir()) == sorted(p.name for p in (one / out).iterdir())
    alone, shared = _vectors(one / "ti"), _vectors(multi / "ti")
    for name in alone:
        torch.testing.assert_close(shared[name], alone[name], atol=1e-5, rtol=0)
    for label in LABELS:  # the losses logged are the whole batch's too
        one_loss, two_loss = (json.loads((d / "ti.json").read_text())["tokens"][label]["final_loss"]
                              for d in (one / "ti", multi / "ti"))
        assert two_loss == pytest.approx(one_loss, abs=1e-5)
    alone, shared = load_file(one / "lora" / adapters.LORA_FILE), load_file(multi / "lora" / adapters.LORA_FILE)
    assert alone.keys() == shared.keys()
    for key in alone:
        torch.testing.assert_close(shared[key], alone[key], atol=1e-5, rtol=0)
