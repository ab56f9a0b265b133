"""The quality, reference and select stages in the real pipeline (issue 17), on the reduced demo.

One module-scoped fixture runs tests/dvcrepo.py's reduced demo as an experiment with the paper's
protocol (select.rules: []), then again with `-S 'select.rules=[lesion]'`, each up to quality@0
and the classifiers that train on synthetic images (the ablation's quality stage runs the same
command on its own folders; tests/test_dvc_yaml.py checks its wiring). The tests check the
quality outputs and headline metrics of the first, that the second re-runs only select and those
classifiers, and that they trained on exactly what select kept. Not [tone]: the reduced demo's
random tiny base leaves every image's skin light, so tone would keep none, which select refuses.
About 8 minutes on 2 busy CPU cores, all in subprocesses (the venv's `dvc` and `skinaug`).
"""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from dvcrepo import LABELS, OVERRIDES, RUN_TIMEOUT_S, Repo, make_repo

from skinaug.classify import quality

pytestmark = pytest.mark.slow
TARGETS = ["quality@0", "classify@0-resnet18-syn", "classify@0-resnet18-real_syn"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Repo, dict]:
    base = tmp_path_factory.mktemp("quality_pipeline")
    repo = make_repo(base)
    sets = [arg for o in OVERRIDES for arg in ("-S", o)]
    logs, kept = {}, {}
    for name, rules in (("paper", "[]"), ("lesion", "[lesion]")):
        logs[name] = repo.dvc("exp", "run", *sets, "-S", f"select.rules={rules}", *TARGETS,
                              timeout=2 * RUN_TIMEOUT_S).stdout  # 2 x: the cores are shared with other jobs
        (base / f"{name}.log").write_text(logs[name])
        kept[name] = {
            "kept": pd.read_csv(repo.path / "data/selected/scenario1/seed0/kept.csv"),
            "metrics": {t: json.loads((repo.path / f"metrics/scenario1/seed0/resnet18_{t}.json").read_text())
                        for t in ("syn", "real_syn")},
            "quality": json.loads((repo.path / "reports/quality/scenario1/metrics_seed0.json").read_text())}
    return repo, {"logs": logs, "runs": kept}


def test_quality_writes_tables_figures_and_headline_metrics(runs):
    repo, out = runs
    folder = repo.path / "reports/quality/scenario1/seed0"
    for name in ("per_image.csv", "by_type.csv", "by_source_type.csv", "by_type_label.csv", "quality.md", "ita_vs_lesion.png", "grid.png"):
        assert (folder / name).stat().st_size > 0, name
    by_type = pd.read_csv(folder / "by_type.csv")
    train = pd.read_csv(repo.path / "data/splits/scenario1/seed0/train.csv")
    test = set(pd.read_csv(repo.path / "data/splits/scenario1/seed0/test.csv").md5hash)
    for _, row in by_type[by_type.fitzpatrick_scale != "all"].iterrows():
        n_train = int((train.fitzpatrick_scale == int(row.fitzpatrick_scale)).sum())
        assert row.reference == f"train {n_train}" and row.n_ref == n_train  # scenario 1: flex_dark is the test set
    per_image = pd.read_csv(folder / "per_image.csv")
    assert not set(per_image.source_md5hash) & test
    head = out["runs"]["paper"]["quality"]
    assert head["n_syn"] == len(per_image) and head["features"] == "classifier"
    assert 0 <= head["lesion_kept_pct"] <= 100 and 0 <= head["tone_in_band_pct"] <= 100
    assert head["fd"] is not None and head["fd"] >= 0
    assert re.search(r"Running stage 'quality@0'", out["logs"]["paper"])
    assert len(LABELS) == len(pd.read_csv(folder / "by_type_label.csv").label.unique())


def test_no_rules_keep_every_image(runs):
    repo, out = runs
    paper = out["runs"]["paper"]
    manifest = pd.read_csv(repo.path / "data/synthetic/scenario1/seed0/manifest.csv")
    assert paper["kept"].equals(manifest)
    assert paper["metrics"]["syn"]["n_train"]["syn"] == len(manifest)


def test_a_rule_reruns_only_select_and_the_synthetic_classifiers(runs):
    repo, out = runs
    ran = set(re.findall(r"Running stage '([^']+)'", out["logs"]["lesion"]))
    assert ran == {"select@0", "classify@0-resnet18-syn", "classify@0-resnet18-real_syn"}, ran
    picked, paper = out["runs"]["lesion"], out["runs"]["paper"]
    assert len(picked["kept"]) < len(paper["kept"])
    assert set(picked["kept"].file) <= set(paper["kept"].file)
    assert picked["metrics"]["syn"]["n_train"]["syn"] == len(picked["kept"])
    assert picked["metrics"]["real_syn"]["n_train"]["real"] == paper["metrics"]["real_syn"]["n_train"]["real"]
    decisions = pd.read_csv(repo.path / "data/selected/scenario1/seed0/decisions.csv")
    assert list(picked["kept"].file) == list(decisions.file[decisions.predicted == decisions.label])
    print({name: {t: (m["n_train"], round(m["accuracy_pct"], 2)) for t, m in r["metrics"].items()}
           for name, r in out["runs"].items()})


def test_exp_show_has_the_quality_headline(runs):
    repo, _ = runs
    shown = json.loads(repo.dvc("exp", "show", "--json").stdout)
    found = []
    for row in shown if isinstance(shown, list) else [shown]:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = ((rev.get("data") or {}).get("metrics") or {})
                found += [m["data"] for path, m in metrics.items() if path.endswith("quality/scenario1/metrics_seed0.json")]
    assert len(found) == 2 and all(set(quality.HEADLINE) <= set(m) for m in found), found
