"""The real pipeline as DVC users drive it (issue 5, points 1 and 5), on a reduced demo.

One module-scoped fixture copies the repository's tracked files (as they are in the working tree)
into a throwaway git + DVC repository and runs the real `dvc.yaml` twice with `dvc exp run`:
scenario 1, then scenario 2, shrunk by -S overrides to seconds per stage (two labels, one seed,
a random tiny base, 2 training and sampling steps, one epoch (the ablation's classifiers two),
three ablation strategies). The tests
then check, in this order, on that workspace (scenario 2 applied):

- `dvc exp show --json` has one experiment per scenario, with its params and its metrics filled;
- the ablation (paper Table 5) is scenario 1's in both, run once, and in the scenario 2 report;
- `dvc repro` on the unchanged workspace runs nothing and touches no output;
- changing one param makes `dvc status` list only the stages that read it;
- a `dvc repro` killed mid-generation resumes without retraining the adapters or losing images.

About 5 minutes on 2 CPU cores, all in subprocesses (the venv's `dvc` and `skinaug`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml
from dvcrepo import DVC, LABELS, OVERRIDES, RUN_TIMEOUT_S, STRATEGIES, Repo, make_repo

pytestmark = pytest.mark.slow

KILL_WINDOW_S = 180  # how long the interrupted run may take to write its first images
SCENARIOS = (1, 2)  # 2: the ablation's dark flexible images are training images there


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Repo, dict]:
    """The reduced demo run as two experiments (scenarios 1 and 2); returns the repo and `dvc exp show --json`."""
    base = tmp_path_factory.mktemp("pipeline")
    repo = make_repo(base)
    sets = [arg for o in OVERRIDES for arg in ("-S", o)]
    for scenario in SCENARIOS:
        out = repo.dvc("exp", "run", *sets, "-S", f"scenario={scenario}", timeout=RUN_TIMEOUT_S).stdout
        (base / f"scenario{scenario}.log").write_text(out)
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    return repo, shown


def _experiments(shown) -> list[dict]:
    """The experiment revisions of `dvc exp show --json` (DVC 3: rows → experiments → revs)."""
    rows = shown if isinstance(shown, list) else [shown]
    found = []
    for row in rows:
        for exp in row.get("experiments") or []:
            found += [rev for rev in exp.get("revs") or [] if rev.get("data")]
    return found


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_exp_show_has_one_row_per_scenario_with_metrics(pipeline):
    _, shown = pipeline
    rows = {}
    for rev in _experiments(shown):
        data = rev["data"]
        params = data["params"]["params.yaml"]["data"]
        assert params["profile"] == "demo"
        assert params["subset"]["labels"] == LABELS and params["splits"]["seeds"] == [0]  # the overrides landed
        assert params["scenario"] not in rows, f"two experiments of scenario {params['scenario']}"
        rows[params["scenario"]] = data["metrics"]["reports/metrics.json"]["data"]
    assert sorted(rows) == list(SCENARIOS)
    for scenario, metrics in rows.items():
        assert metrics["scenario"] == scenario
        for train_type in ("real", "syn", "real_syn"):
            cell = metrics["resnet18"][train_type]
            assert _num(cell["accuracy_pct"]) and 0 <= cell["accuracy_pct"] <= 100, (scenario, train_type, cell)
            assert _num(cell["f1_pct"]), (scenario, train_type, cell)


def test_ablation_is_scenario_1_whatever_the_study_runs(pipeline):
    """In scenario 1 the study's stages make the ablation's splits, tokens, LoRA and reference: trained
    once. In scenario 2 the ablation's own stages, the same commands, come out of DVC's run cache
    (splits, seconds, are made again), and nothing that reads them runs again."""
    repo, _ = pipeline
    assert repo.params()["scenario"] == 2
    logs = {s: (repo.path.parent / f"scenario{s}.log").read_text() for s in SCENARIOS}
    ran = {s: set(re.findall(r"Running stage '([^']+)'", log)) for s, log in logs.items()}
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run", logs[2]))
    trainers = ("textual_inversion@0", "lora@0", "reference@0")
    readers = {"ablation_lora_plain@0",
               *(f"ablation_{stage}@0-{s}" for stage in ("generate", "classify", "quality") for s in STRATEGIES)}
    assert {"splits@0", *trainers, *readers} <= ran[1]
    assert not {s for s in ran[1] if s.startswith(("ablation_splits", "ablation_textual", "ablation_lora@",
                                                   "ablation_reference"))}, ran[1]
    assert {f"ablation_{t}" for t in trainers} <= restored, logs[2]
    assert "ablation_splits@0" in ran[2] and {"splits@0", *trainers} <= ran[2]  # scenario 2's own study
    assert not readers & ran[2]  # scenario 2 keeps scenario 1's ablation
    for strategy in STRATEGIES:
        for test_name in ("flex_light", "flex_dark"):
            record = json.loads((repo.path / f"metrics/ablation/seed0/{strategy}_{test_name}.json").read_text())
            assert record["scenario"] == 1 and record["n_test"] == 8 * len(LABELS)  # splits.per_label
            assert record["epochs"] == 2  # ablation.epochs (dvcrepo.OVERRIDES), not classify.epochs (1)
    results = (repo.path / "reports/results.md").read_text()
    assert "## Scenario 2" in results and "## Ablation (Table 5): scenario 1" in results


def test_ablation_lora_rows_use_the_lora_trained_their_way(pipeline):
    """Table 5's img2img LoRA row uses the plain-name LoRA, its TI+LoRA row (the method) the one
    trained with the learned tokens: different files, each made as its row needs."""
    repo, _ = pipeline
    used = {}
    for strategy, folder, tokens in (("img2img_lora", "models/ablation/seed0/lora_plain", False),
                                     ("img2img_ti_lora", "models/scenario1/seed0/lora", True)):  # the study's
        lora_dir = repo.path / folder
        assert json.loads((lora_dir / "lora.json").read_text())["tokens"] is tokens
        with open(repo.path / f"data/synthetic/ablation/seed0/{strategy}/manifest.csv", newline="") as f:
            (used[strategy],) = {row["lora_sha256"] for row in csv.DictReader(f)}
        weights = lora_dir / "pytorch_lora_weights.safetensors"
        assert used[strategy] == hashlib.sha256(weights.read_bytes()).hexdigest(), strategy
    assert used["img2img_lora"] != used["img2img_ti_lora"]


def test_repro_on_unchanged_workspace_does_nothing(pipeline):
    repo, _ = pipeline
    assert repo.params()["scenario"] == SCENARIOS[-1]  # the last experiment is applied to the workspace
    assert repo.status() == set()
    before = repo.snapshot()
    out = repo.dvc("repro").stdout
    assert "Data and pipelines are up to date" in out, out
    assert "Running stage" not in out, out
    assert repo.snapshot() == before


def _stage_names(repo: Repo) -> set[str]:
    out = repo.dvc("stage", "list", "--name-only").stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("classify.epochs", 2, {"classify_real@0-resnet18", "classify@0-resnet18-syn", "classify@0-resnet18-real_syn",
                            "reference@0", "ablation_reference@0", *(f"ablation_classify@0-{s}" for s in STRATEGIES)}),
    ("ablation.epochs", 3, {f"ablation_classify@0-{s}" for s in STRATEGIES}),
    ("quality.nearest_k", 3, {"quality@0", *(f"ablation_quality@0-{s}" for s in STRATEGIES)}),
    ("select.best_n", 2, {"select@0"}),
    ("generate.guidance", 3.0, {"generate@0", *(f"ablation_generate@0-{s}" for s in STRATEGIES)}),
    ("lora.rank", 4, {"lora@0", "ablation_lora@0", "ablation_lora_plain@0"}),
    # generation reads the LoRA layout: one LoRA, or one folder per label
    ("lora.mode", "per_label", {"lora@0", "ablation_lora@0", "ablation_lora_plain@0", "generate@0",
                                *(f"ablation_generate@0-{s}" for s in STRATEGIES)}),
    ("textual_inversion.templates", "imagenet", {"textual_inversion@0", "ablation_textual_inversion@0"}),
    ("splits.dark", [6], {"splits@0", "ablation_splits@0", "generate@0", "report",
                          *(f"ablation_generate@0-{s}" for s in STRATEGIES)}),
    # the matrix axis: a new architecture adds its own stages and leaves the trained ones alone (the
    # backbone stage runs again for the new one's backbone; resnet18's record, their dep, stays the same)
    ("classify.archs", ["resnet18", "vgg16"], {"backbone", "classify_real@0-vgg16", "classify@0-vgg16-syn",
                                               "classify@0-vgg16-real_syn"}),
    ("model.tiny_vae_batch", 32, {"base"}),  # the demo's base (the reduced demo trains it 0 steps)
    ("model.tiny_unet_batch", 16, {"base"}),
    # speed only: another device or batch size re-runs nothing
    ("model.device", "auto", set()),
    ("generate.batch_size", 4, set()),
])
def test_changing_one_param_changes_only_the_stages_that_read_it(pipeline, key, value, expected):
    repo, _ = pipeline
    params_file = repo.path / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    section, name = key.split(".")
    assert params[section][name] != value
    params[section][name] = value
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        assert expected <= _stage_names(repo)
        assert repo.status() == expected
    finally:
        params_file.write_text(original)
    assert repo.status() == set()


def test_interrupted_repro_resumes_without_redoing_finished_work(pipeline):
    repo, _ = pipeline
    scenario = repo.params()["scenario"]
    out_dir = repo.path / f"data/synthetic/scenario{scenario}/seed0"
    images = out_dir / "images"
    planned = len((out_dir / "manifest.csv").read_text().strip().splitlines()) - 1
    assert planned >= 40, f"only {planned} images planned: too few batches to stop between"
    params_file = repo.path / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["generate"]["guidance"] = 3.0  # other images: generate@0 must start over, then be stopped
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    with open(repo.path.parent / "interrupted.log", "w") as log:
        proc = subprocess.Popen([*DVC, "repro", "generate@0"], cwd=repo.path, env=repo.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline, done = time.monotonic() + KILL_WINDOW_S, 0
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                # images of the old guidance are removed when the stage starts: wait for the new ones
                fresh = [p for p in images.glob("*.png")] if images.exists() else []
                if (out_dir / "manifest.csv").exists():
                    fresh = []
                done = len(fresh)
                if planned // 8 <= done < planned * 3 // 4:
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    interrupted = (repo.path.parent / "interrupted.log").read_text()
    if proc.returncode == 0 or (out_dir / "manifest.csv").exists():
        pytest.skip(f"generate@0 finished before it could be stopped ({done} of {planned} images seen)")
    assert "starting over" in interrupted, interrupted
    # finished images only: a write cut by the kill leaves its temp file (.{name}.*.tmp.png), which
    # the resumed stage deletes
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.glob("*.png")
            if not p.name.startswith(".")}
    if not kept:
        pytest.skip(f"generate@0 was stopped before it wrote an image ({done} seen)")
    assert len(kept) < planned

    out = repo.dvc("repro", timeout=RUN_TIMEOUT_S).stdout  # generation and all after it: a run, not a command
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert "generate@0" in ran, out
    assert not ran & {"world", "subset", "images", "splits@0", "base", "textual_inversion@0", "lora@0",
                      "ablation_lora@0", "ablation_lora_plain@0"}, out
    stage = out.split("Running stage 'generate@0'", 1)[1].split("Running stage", 1)[0]
    assert "starting over" not in stage, stage
    summary = re.search(r"generate: (\d+) images \((\d+) new\) in ", stage)
    assert summary, stage
    assert int(summary.group(1)) == planned
    assert int(summary.group(2)) <= planned - len(kept)  # the images made before the kill were kept
    for name, stamp in kept.items():
        path = images / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{name} was made again"

    with open(out_dir / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    listed = {row["file"] for row in manifest}
    on_disk = {f"images/{p.name}" for p in images.iterdir()}
    assert listed == on_disk and len(manifest) == planned
    assert {float(row["guidance"]) for row in manifest} == {3.0}
    assert repo.status() == set()
    assert "Data and pipelines are up to date" in repo.dvc("repro").stdout
