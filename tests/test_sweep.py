"""`skinaug sweep-report`: finished DVC experiments -> table and figure against the swept setting.

The fast tests read a `dvc exp show --json` document captured from DVC 3.67 (tests/data/
exp_show_strength.json: a finished strength-0.3 experiment of the reduced demo and its workspace and
baseline rows, as captured less their deps and outs; by hand, the running strength-0.7 one made
finished like it, and a queued and a failed one added) with files served from memory; the slow one
queues a real two-value sweep of the reduced demo (tests/dvcrepo.py) and also checks that the
DVCLive curves show in `dvc plots diff`.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError
from skinaug.cli import main
from skinaug.report import sweep

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def shown() -> list:
    return json.loads((DATA / "exp_show_strength.json").read_text())


def record(arch, train_type, seed, acc5, acc6, n5=10, n6=30):
    return {"arch": arch, "train_type": train_type, "seed": seed, "scenario": 1,
            "accuracy_pct_by_fitzpatrick_scale": {"5": acc5, "6": acc6},
            "n_test_by_fitzpatrick_scale": {"5": n5, "6": n6}}


def tone_csv(syn_ita, light_ita) -> bytes:
    rows = [{"group": "real light", "ita": v, "in_band": True} for v in light_ita]
    rows += [{"group": "synthetic from light", "ita": v, "in_band": v < 10} for v in syn_ita]
    rows += [{"group": "real dark", "ita": -50.0, "in_band": True}]
    return pd.DataFrame(rows).to_csv(index=False).encode()


def store(exps, files_of):
    """A reader and a lister over {(rev, path): bytes} built per experiment by files_of(exp)."""
    files = {(e["rev"], path): data for e in exps for path, data in files_of(e).items()}

    def read(rev, path):
        return files.get((rev, path))

    def listdir(rev, folder):
        return sorted(p for r, p in files if r == rev and p.startswith(folder + "/"))

    return read, listdir


def demo_files(e):
    """Two seeds, two classifiers; dark accuracy (pooled over FST 5 and 6) rises with strength."""
    s = e["params"]["generate.strength"]
    out = {}
    for seed in (0, 1):
        for train_type in ("real", "real_syn"):
            gain = 100 * s if train_type == "real_syn" else 0
            out[f"metrics/scenario1/seed{seed}/resnet18_{train_type}.json"] = json.dumps(
                record("resnet18", train_type, seed, 40 + gain + seed, 40 + gain + seed)).encode()
    out[sweep.TONE_CSV] = tone_csv([50 - 100 * s] * 3, [50.0, 52.0, 54.0])
    return out


def test_finished_experiments_are_read_from_dvc3_exp_show(shown):
    exps = sweep.experiments(shown)
    assert sorted(e["name"] for e in exps) == ["mossy-jird", "pally-quiz"]  # not the queued, failed or baseline
    by_name = {e["name"]: e for e in exps}
    assert by_name["mossy-jird"]["params"]["generate.strength"] == 0.3
    assert by_name["pally-quiz"]["params"]["generate.strength"] == 0.7
    assert by_name["mossy-jird"]["params"]["splits.seeds"] == [0, 1]
    assert all(len(e["rev"]) == 40 for e in exps)
    assert sweep.swept_param(exps, None) == "generate.strength"


def test_dvc2_layout_is_read_too(shown):
    exps = sweep.experiments(shown)
    dvc2 = {"workspace": {"baseline": {"data": {"params": {}}}},
            "b" * 40: {"baseline": {"data": {"name": "main", "params": {}}},
                       **{e["rev"]: {"data": {"name": e["name"], "params": {"params.yaml": {"data": {
                           "generate": {"strength": e["params"]["generate.strength"]}}}}}} for e in exps}}}
    old = sweep.experiments(dvc2)
    assert sorted((e["name"], e["params"]["generate.strength"]) for e in old) == [("mossy-jird", 0.3), ("pally-quiz", 0.7)]


def test_report_gives_mean_spread_and_each_seed_per_swept_value(shown, tmp_path):
    exps = sweep.experiments(shown)
    table = sweep.write_report(exps, tmp_path, *store(exps, demo_files))
    assert list(table.value) == [0.3, 0.3, 0.7, 0.7] and set(table.train_type) == {"real", "real_syn"}
    row = table[(table.value == 0.7) & (table.train_type == "real_syn")].iloc[0]
    assert row.dark_accuracy_pct_mean == pytest.approx(110.5)  # seeds 0 and 1: 110 and 111
    assert row.dark_accuracy_pct_std == pytest.approx(np.std([110, 111], ddof=1), abs=1e-4)
    assert row.dark_accuracy_pct_by_seed == "0: 110.00; 1: 111.00" and row.n_seeds == 2
    assert row.tone_shift_deg == pytest.approx((50 - 70) - 52)  # median syn-from-light minus median real light
    assert row.syn_in_band_pct == 100.0 and table.loc[0, "syn_in_band_pct"] == 0.0  # ITA 20 is not < 10
    assert sweep.QUALITY_KEY not in table  # no quality stage yet
    csv = pd.read_csv(tmp_path / "sweep.csv")
    assert list(csv.columns[:4]) == ["param", "value", "arch", "train_type"] and len(csv) == 4
    md = (tmp_path / "sweep.md").read_text()
    assert "# Sweep over generate.strength" in md and "110.50 ± 0.71" in md and "ResNet-18 real+syn" in md
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1] * 0.9  # two panels side by side


def test_a_quality_metric_adds_a_column_and_a_panel(shown, tmp_path):
    exps = sweep.experiments(copy.deepcopy(shown))
    for e in exps:
        kept = {0.3: 90.0, 0.7: 70.0}[e["params"]["generate.strength"]]
        e["metrics"]["reports/quality.json"] = {"quality": {"lesion_kept_pct": kept}}
    table = sweep.write_report(exps, tmp_path, *store(exps, demo_files))
    assert sorted(set(zip(table.value, table.lesion_kept_pct))) == [(0.3, 90.0), (0.7, 70.0)]
    assert "lesion kept %" in (tmp_path / "sweep.md").read_text()
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.size[0] > 3 * im.size[1] * 0.9


def test_lesion_kept_is_the_mean_over_the_seeds_quality_files():
    metrics = {"reports/quality/scenario1/metrics_seed0.json": {"lesion_kept_pct": 20.0, "fd": 3.0},
               "reports/quality/scenario1/metrics_seed42.json": {"lesion_kept_pct": 10.0},
               "reports/metrics.json": {"scenario1": {"real_syn": {"accuracy_pct": 55.0}}}}
    assert sweep.quality(metrics) == 15.0
    assert math.isnan(sweep.quality({"reports/metrics.json": {"accuracy_pct": 55.0}}))


def test_dark_accuracy_pools_the_dark_types_by_their_counts():
    assert sweep.dark_accuracy(record("vgg16", "real", 0, 50.0, 100.0, n5=10, n6=30), [5, 6]) == 87.5
    assert sweep.dark_accuracy(record("vgg16", "real", 0, 50.0, 100.0), [6]) == 100.0
    assert np.isnan(sweep.dark_accuracy(record("vgg16", "real", 0, 50.0, 100.0), [4]))


def test_mistakes_are_named(shown, tmp_path):
    exps = sweep.experiments(shown)
    read, listdir = store(exps, demo_files)
    with pytest.raises(SkinaugError, match="a sweep needs two or more"):
        sweep.write_report(exps[:1], tmp_path, read, listdir)
    same = copy.deepcopy(exps)
    same[1]["params"]["generate.strength"] = same[0]["params"]["generate.strength"]
    with pytest.raises(SkinaugError, match="name the swept param with --param"):
        sweep.write_report(same, tmp_path, read, listdir)
    with pytest.raises(SkinaugError, match=r"generate.strength=0\.[37] seed 0 ran in more than one experiment \(mossy-jird, pally-quiz\)"):
        sweep.write_report(same, tmp_path, read, listdir, param="generate.strength")
    with pytest.raises(SkinaugError, match="generate.nope is not a param"):
        sweep.write_report(exps, tmp_path, read, listdir, param="generate.nope")
    with pytest.raises(SkinaugError, match="no finished experiment named nope; finished: mossy-jird, pally-quiz"):
        sweep.select(exps, ("nope",))
    with pytest.raises(SkinaugError, match="has no classifier metrics"):
        sweep.write_report(exps, tmp_path, read, lambda rev, folder: [])
    assert not (tmp_path / "sweep.csv").exists()


def test_cli_outside_a_dvc_repository_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep-report", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert result.output.count("\n") == 1


@pytest.mark.slow
def test_a_queued_strength_sweep_of_the_reduced_demo_reports_and_plots(tmp_path):
    """The README's sweep, reduced: two strengths queued, run, reported; their DVCLive curves in `dvc plots diff`.

    Only the stages the report reads are targeted (no ablation, no report stage): about 1.5 minutes on 2 CPU cores.
    """
    from dvcrepo import OVERRIDES, RUN_TIMEOUT_S, make_repo

    repo = make_repo(tmp_path)
    sets = [arg for o in OVERRIDES if not o.startswith("generate.steps") for arg in ("-S", o)]
    queued = repo.dvc("exp", "run", "--queue", *sets, "-S", "generate.steps=4",  # 0.3 x 4 steps: img2img runs one
                      "-S", "generate.strength=0.3,0.7", "classify_real", "classify", "tone").stdout
    assert queued.count("Queued experiment") == 2
    repo.dvc("exp", "run", "--run-all", "-j", "1", timeout=2 * RUN_TIMEOUT_S)
    exps = sweep.experiments(json.loads(repo.dvc("exp", "show", "--json").stdout))
    assert len(exps) == 2
    logs = [(lambda done: done.stdout + done.stderr)(repo.dvc("queue", "logs", e["name"])) for e in exps]
    # the second experiment takes the first's adapters from the run cache (their curves are cached outputs)
    assert any("Stage 'textual_inversion@0' is cached" in log and "Stage 'lora@0' is cached" in log for log in logs)
    # their stages run in `make demo`'s warm process, though a Celery worker runs each experiment
    assert not [line for log in logs for line in log.splitlines() if "running cold" in line]

    out = repo.run("skinaug", "sweep-report", "reports/sweep").stdout
    assert "generate.strength over 2 values, 2 experiments" in out
    table = pd.read_csv(repo.path / "reports" / "sweep" / "sweep.csv")
    assert sorted(set(table.value)) == [0.3, 0.7] and set(table.train_type) == {"real", "syn", "real_syn"}
    assert table.dark_accuracy_pct_mean.between(0, 100).all() and (table.n_seeds == 1).all()
    real = table[table.train_type == "real"].dark_accuracy_pct_mean
    assert real.nunique() == 1  # the real-only classifiers do not read generate.*: the same in both
    assert table.tone_shift_deg.notna().all() and table.tone_shift_deg.nunique() == 2
    with Image.open(repo.path / "reports" / "sweep" / "sweep.png") as im:
        assert im.format == "PNG"

    names = [e["name"] for e in exps]
    plots = json.loads(repo.dvc("plots", "diff", *names, "--json").stdout)
    ours = [e for e in plots.get("errors") or [] if e["source"].startswith("dvclive/scenario1/")]
    assert not ours, ours  # (the ablation's and the report's plots do not exist: those stages were not targeted)
    rendered = plots["data"]
    for curve in ("dvclive/scenario1/seed0/resnet18_real_syn/plots/metrics/train/loss.tsv",
                  "dvclive/scenario1/seed0/lora/plots/metrics/loss/joint.tsv"):
        (plot,) = rendered[curve]
        assert sorted(plot["revisions"]) == sorted(names)
        assert {row["rev"] for row in plot["content"]["data"]["values"]} == set(names)
    assert any(p.startswith("dvclive/scenario1/seed0/ti/plots/metrics/loss/") for p in rendered)
