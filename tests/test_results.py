"""The report: aggregation against hand-computed numbers, paper-layout tables with every cell
filled, the reference rule kept apart, the headline JSON, and figures that render.

Fixture metrics are copies of one real classifier record (so they share its schema), scored by
classify.score on per-image predictions built to hand-set accuracies (100 test images per skin type),
which are written beside them as classify writes them. Std is the sample standard deviation (ddof=1),
as pandas computes it.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError, atomic, config, paper
from skinaug.classify import classifiers, scoring
from skinaug.cli import main
from skinaug.report import figures, results
from skinaug.report.names import STRATEGY_NAMES

from test_classifiers import ROOT, small_cfg, write_study

SEEDS = (0, 42, 123)
REAL_ACC = {0: 50, 42: 60, 123: 70}  # mean 60, sample std 10 (population std would be 8.16)
GAIN = {0: 1, 42: 2, 123: 6}  # real+syn − real: mean 3, sample std sqrt(7)


def report_cfg() -> config.Config:
    """The real params with the fewest bootstrap resamples the rules allow (speed; same code path)."""
    cfg = small_cfg()
    return config.replace(cfg, report=config.replace(cfg.report, bootstrap=1000))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = write_study(root)
    (template,) = classifiers.run(paths["split_dir"], paths["images_dir"], paths["syn_dir"], {"test": root / "one.json"},
                               "resnet18", "real_syn", small_cfg(epochs=1), seed=0)
    return {**paths, "template": template, "root": root}


def record(template: dict, **changes) -> dict:
    rec = copy.deepcopy(template)
    rec.update(changes)
    return rec


def write_run(path: Path, template: dict, correct_pct_by_fst: dict[int, int], per_fst: int = 100,
              key: str = "", **changes) -> dict:
    """A classifier's metrics JSON at `path` and its per-image predictions beside it: `per_fst` test
    images per skin type, the first correct_pct_by_fst[s] % of them right, the others taken for the
    next label. Images are named by `key`, skin type and number: runs with the same key share them."""
    labels = template["labels"]
    true, pred, fst, names = [], [], [], []
    for s, pct in correct_pct_by_fst.items():
        right = round(per_fst * pct / 100)
        assert right == per_fst * pct / 100, "a percentage the images can give exactly"
        for i in range(per_fst):
            true.append(i % len(labels))
            pred.append(true[-1] if i < right else (true[-1] + 1) % len(labels))
            fst.append(s)
            names.append(f"{key}-{s}-{i:04d}")
    rec = record(template, **scoring.score(true, pred, labels, fst), **changes)
    atomic.write_csv(scoring.predictions_path(path), pd.DataFrame({
        "md5hash": names, "fitzpatrick_scale": fst, "label": [labels[i] for i in true],
        "predicted": [labels[i] for i in pred]}))
    atomic.write_json(path, rec)
    return rec


def write_metrics(metrics_dir: Path, template: dict, scenario: int = 1, selection: str = "last",
                  archs=classifiers.ARCHS) -> None:
    """3 archs × 3 train types × 3 seeds; syn = real + 1, real+syn = real + GAIN; FST 5 accuracy + 5, FST 6 − 5."""
    sel = {"rule": selection, "label": config.SELECTION_LABELS[selection], "honest": selection != "test_reference"}
    for seed in SEEDS:
        for a, arch in enumerate(archs):
            for train_type in config.TRAIN_TYPES:
                acc = REAL_ACC[seed] + a + {"real": 0, "syn": 1, "real_syn": GAIN[seed]}[train_type]
                write_run(metrics_dir / f"scenario{scenario}" / f"seed{seed}" / f"{arch}_{train_type}.json", template,
                          {5: acc + 5, 6: acc - 5}, key=f"s{seed}", scenario=scenario, seed=seed, arch=arch,
                          train_type=train_type, selection=sel)


ABLATION_SHIFT = {0: 0, 42: 2}  # seed 42 scores 2 points (light) and 4 points (dark) above seed 0


def write_ablation(metrics_dir: Path, template: dict, folder: str = "scenario1/ablation") -> None:
    """Two seeds (dvc.yaml: {folder}/seed{S}/{strategy}_{test}.json): light 20 + i (+2), dark 40 + 2i (+4)."""
    sel = {"rule": "last", "label": config.SELECTION_LABELS["last"], "honest": True}
    for seed, shift in ABLATION_SHIFT.items():
        for i, strategy in enumerate(paper.ABLATION):
            for test_name, acc, types in (("flex_light", 20 + i + shift, (1, 2)),
                                          ("flex_dark", 40 + 2 * i + 2 * shift, (5, 6))):
                write_run(metrics_dir / folder / f"seed{seed}" / f"{strategy}_{test_name}.json", template,
                          dict.fromkeys(types, acc), key=f"{test_name}{seed}", seed=seed, arch="vgg16",
                          train_type="syn", test_name=test_name, selection=sel)


def tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, separator dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


@pytest.fixture(scope="module")
def built(study, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("built")
    metrics_dir = tmp_path / "metrics"
    write_metrics(metrics_dir, study["template"])
    write_metrics(metrics_dir, study["template"], scenario=2, selection="test_reference")
    write_ablation(metrics_dir, study["template"])
    out = tmp_path / "reports"
    head = results.build_report(metrics_dir, out, report_cfg(), split_dir=study["split_dir"],
                               images_dir=study["images_dir"], syn_dir=study["syn_dir"])
    return {"out": out, "head": head, "metrics_dir": metrics_dir}


def f1s(built, name: str) -> list[float]:
    """Macro F1 of each seed's run, as classify.score gave it."""
    return [json.loads((built["metrics_dir"] / f"scenario1/seed{s}/{name}.json").read_text())["f1_pct"] for s in SEEDS]


def test_aggregation_matches_hand_computed_mean_and_sample_std(built):
    summary = pd.read_csv(built["out"] / "summary.csv")
    row = summary[(summary.scenario == 1) & (summary.arch == "vgg16") & (summary.train_type == "real")].iloc[0]
    assert row.accuracy_pct_mean == pytest.approx(60.0) and row.accuracy_pct_std == pytest.approx(10.0)
    assert row.f1_pct_mean == pytest.approx(np.mean(f1s(built, "vgg16_real")))
    assert row.n_seeds == 3 and row.paper_accuracy_pct == 70.24
    paired = pd.read_csv(built["out"] / "paired_difference.csv")
    p = paired[(paired.scenario == 1) & (paired.arch == "resnet18")].iloc[0]
    assert p.accuracy_pct_diff_mean == pytest.approx(3.0) and p.accuracy_pct_diff_std == pytest.approx(math.sqrt(7))
    assert p.paper_accuracy_pct_diff == pytest.approx(71.36 - 68.45)
    skin = pd.read_csv(built["out"] / "accuracy_by_skin_type.csv")
    s = skin[(skin.scenario == 1) & (skin.arch == "vgg16") & (skin.train_type == "real")].set_index("group")
    assert s.loc["FST 5", "accuracy_pct_mean"] == pytest.approx(65.0)
    assert s.loc["FST 6", "accuracy_pct_std"] == pytest.approx(10.0)


def test_report_renders_the_paper_tables_with_every_cell_filled(built):
    text = (built["out"] / "results.md").read_text()
    honest, leaky = text.split("# ⚠ Selected on the TEST set")
    layout = tables(honest)[0]  # scenario 1, the Table 2 layout
    assert layout[0][:4] == ["Model", "Accuracy real", "Accuracy syn", "Accuracy real+syn"] and len(layout[0]) == 13
    assert [r[0] for r in layout[1:]] == ["VGG-16", "ResNet-18", "ViT-B-16"]
    assert layout[1][1] == "60.00 ± 10.00" and layout[1][3] == "63.00 ± 12.53"  # 51, 62, 76
    for table in tables(text):
        for row in table:
            assert all(c and c not in ("–", "nan") and "nan" not in c for c in row), row
    beside = tables(honest)[1]
    assert beside[0][1:3] == ["real paper (reported)", "real ours"] and beside[1][1:3] == ["70.24", "60.00 ± 10.00"]
    assert "Table 2 layout" in honest and "Scenario 2" not in honest  # the leaky runs stay out of the honest part
    assert "Scenario 2" in leaky and "REFERENCE RULE" in leaky
    table5 = tables(text)[-1]  # seeds 0 and 42: light 20, 22; dark 40, 44; gap -20, -22
    assert table5[1][:4] == ["txt2img vanilla", "21.00 ± 1.41", "42.00 ± 2.83", "-21.00 ± 1.41"]
    low, high = map(float, table5[1][4].strip("[]").split(", "))  # the gap's interval, around its mean
    assert -30 < low < -21 < high < -12
    assert table5[1][5:] == ["21.00 ± 1.41 (FST 1)", "18.80", "21.22"]  # worst: the light set, FST 1 first of a tie
    assert "seeds 0, 42" in text
    assert [r[0] for r in table5[1:]] == [STRATEGY_NAMES[s] for s in paper.ABLATION]  # Table 5's order
    layout_csv = pd.read_csv(built["out"] / "table_scenario1.csv")
    assert layout_csv.notna().all().all() and layout_csv.shape == (3, 13)
    assert (built["out"] / "table_scenario2_test_reference.csv").exists()


def test_headline_metrics_and_plot_data(built):
    head = json.loads((built["out"] / "metrics.json").read_text())
    assert head == built["head"]
    assert head["scenario"] == 1 and head["selection"] == "last"
    assert head["vgg16"]["real"] == {"accuracy_pct": 60.0, "f1_pct": round(np.mean(f1s(built, "vgg16_real")), 4)}
    assert head["vit_b_16"]["real_syn"]["accuracy_pct"] == pytest.approx(65.0)
    plot = pd.read_csv(built["out"] / "plots" / "accuracy.csv")
    assert len(plot) == 9 and list(plot.columns) == ["model", "accuracy_pct", "f1_pct"]


def test_test_selected_runs_never_take_the_honest_headline_names(study, tmp_path):
    write_metrics(tmp_path / "metrics", study["template"], selection="test_reference", archs=["vgg16"])
    head = results.build_report(tmp_path / "metrics", tmp_path / "out", report_cfg())
    assert head["selection"] == "test_reference" and set(head) == {"scenario", "selection", "test_reference"}
    assert head["test_reference"]["vgg16"]["real"]["accuracy_pct"] == pytest.approx(60.0)
    plot = pd.read_csv(tmp_path / "out" / "plots" / "accuracy.csv")
    assert len(plot) == 3 and plot.model.str.endswith("(TEST-selected, reference rule)").all()
    # once honest runs of the scenario exist beside them, they alone are the headline
    write_metrics(tmp_path / "metrics" / "honest", study["template"], selection="last", archs=["vgg16"])
    head = results.build_report(tmp_path / "metrics", tmp_path / "out", report_cfg())
    assert head["selection"] == "last" and "test_reference" not in head and "vgg16" in head
    assert not pd.read_csv(tmp_path / "out" / "plots" / "accuracy.csv").model.str.contains("TEST").any()


def test_figures_render(built):
    names = ["metrics_scenario1", "confusion_scenario1", "metrics_scenario2_test_reference",
             "confusion_scenario2_test_reference", "real_vs_synthetic"]
    for name in names:
        with Image.open(built["out"] / "figures" / f"{name}.png") as im:
            assert im.format == "PNG" and min(im.size) > 200
            assert im.size[0] <= figures.WIDTH_IN * figures.DPI, f"{name} would be shrunk in a markdown page"


def test_cli_report(study, tmp_path):
    write_metrics(tmp_path / "metrics", study["template"], archs=["vgg16"])
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("bootstrap: 10000", "bootstrap: 1000"))
    result = CliRunner().invoke(main, ["--params", str(params), "report", str(tmp_path / "metrics"),
                                       str(tmp_path / "out"), "--split-dir", str(study["split_dir"])])
    assert result.exit_code != 0 and "together" in result.output
    result = CliRunner().invoke(main, ["--params", str(params), "report", str(tmp_path / "metrics"),
                                       str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "vgg16 real 60.00%" in result.output
    assert (tmp_path / "out" / "results.md").exists() and not (tmp_path / "out" / "figures" / "real_vs_synthetic.png").exists()


def test_ablation_from_its_own_folder_beside_another_scenario(study, tmp_path):
    metrics = tmp_path / "metrics"
    write_metrics(metrics, study["template"], scenario=2)
    write_ablation(metrics, study["template"], folder="ablation")  # dvc.yaml: metrics/ablation, always scenario 1
    head = results.build_report(metrics / "scenario2", tmp_path / "out", config.replace(report_cfg(), scenario=2),
                               ablation_dir=metrics / "ablation")
    assert head["scenario"] == 2
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Ablation (Table 5): scenario 1" in text and "## Scenario 2" in text
    assert "trained on synthetic images only for 1 epoch, seeds" in text  # the ablation's own budget
    assert len(pd.read_csv(tmp_path / "out" / "ablation.csv")) == len(paper.ABLATION)


def test_one_seed_and_missing_runs_are_marked_not_blank(study, tmp_path):
    metrics_dir = tmp_path / "metrics"
    write_ablation(metrics_dir, study["template"])
    head = results.build_report(metrics_dir, tmp_path / "ablation_only", report_cfg())
    assert head == {"scenario": 1, "selection": "last"}
    one = {"template": study["template"], "correct_pct_by_fst": {5: 12.5}, "per_fst": 8, "arch": "resnet18",
           "train_type": "real"}
    write_run(metrics_dir / "scenario1" / "seed0" / "resnet18_real.json", **one)
    results.build_report(metrics_dir, tmp_path / "out", report_cfg())
    layout = tables((tmp_path / "out" / "results.md").read_text())[0]
    assert layout[1][:4] == ["ResNet-18", "12.50 (n=1)", "–", "–"]
    write_run(metrics_dir / "scenario1" / "seed0" / "resnet18_syn.json", **one)
    with pytest.raises(SkinaugError, match="resnet18 real"):
        results.build_report(metrics_dir, tmp_path / "out", report_cfg())


def test_no_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "metrics").mkdir()
    with pytest.raises(SkinaugError, match="no classifier metrics"):
        results.build_report(tmp_path / "metrics", tmp_path / "out", config.load(ROOT / "params.yaml"))


def test_tone_section_carries_the_summary_rows_and_links_the_figure(study, tmp_path):
    metrics_dir = tmp_path / "metrics"
    write_run(metrics_dir / "scenario1" / "seed0" / "resnet18_real.json", study["template"], {5: 12.5}, per_fst=8,
              arch="resnet18", train_type="real")
    tone_dir = tmp_path / "reports" / "tone"
    atomic.write_csv(tone_dir / "tone_summary.csv", pd.DataFrame(
        {"group": ["real dark", "synthetic"], "fitzpatrick_scale": [6, 6], "n": [3, 4], "ita_median": [-69.3, -51.8]}))
    results.build_report(metrics_dir, tmp_path / "reports", report_cfg(), tone_dir=tone_dir)
    text = (tmp_path / "reports" / "results.md").read_text()
    assert "| synthetic | 6 | 4 | -51.8 |" in text and "](tone/tone.png)" in text
    with pytest.raises(SkinaugError, match="run `skinaug tone`"):
        results.build_report(metrics_dir, tmp_path / "out", report_cfg(), tone_dir=tmp_path / "nothing")


def test_classify_writes_the_predictions_the_report_reads(study):
    table = results.read_predictions(study["root"] / "one.json", study["template"])
    assert len(table) == study["template"]["n_test"] and list(table.columns) == ["md5hash", "fitzpatrick_scale",
                                                                                 "true", "pred"]
    assert 100 * (table.true == table.pred).mean() == pytest.approx(study["template"]["accuracy_pct"])


def test_predictions_that_are_missing_or_do_not_match_are_refused(study, tmp_path):
    path = tmp_path / "vgg16_real.json"
    rec = write_run(path, study["template"], {5: 50}, per_fst=10)
    with pytest.raises(SkinaugError, match="does not give the accuracy"):
        results.read_predictions(path, {**rec, "accuracy_pct": 60.0})
    with pytest.raises(SkinaugError, match="does not match vgg16_real.json"):
        results.read_predictions(path, {**rec, "n_test": 11})
    scoring.predictions_path(path).unlink()
    with pytest.raises(SkinaugError, match="vgg16_real.predictions.csv not found.*re-run its classify stage"):
        results.read_predictions(path, rec)


def test_intervals_worst_group_and_the_paired_test_in_the_report(built):
    summary = pd.read_csv(built["out"] / "summary.csv").query("scenario == 1")
    row = summary[(summary.arch == "vgg16") & (summary.train_type == "real")].iloc[0]
    assert row.accuracy_pct_ci_low < 60 < row.accuracy_pct_ci_high  # 200 images a seed: about ± 4
    assert row.worst_group_pct_mean == pytest.approx(55.0) and row.worst_group_fitzpatrick_scale == 6  # 45, 55, 65
    paired = pd.read_csv(built["out"] / "paired_difference.csv").query("scenario == 1")
    p = paired[paired.arch == "resnet18"].iloc[0]
    # real+syn is right on every image real is right on, and on GAIN % more: the interval stays above 0
    assert 0 < p.accuracy_pct_diff_ci_low < 3 < p.accuracy_pct_diff_ci_high
    assert p.accuracy_pct_diff_p == pytest.approx(0.25) and p.p_smallest == pytest.approx(0.25)  # 3 seeds, all gain
    assert p.dark_accuracy_pct_diff_mean == pytest.approx(3.0)  # FST 5 and 6 are the dark types
    by_seed = pd.read_csv(built["out"] / "paired_difference_by_seed.csv").query("scenario == 1 and arch == 'vgg16'")
    assert list(by_seed.accuracy_pct_diff) == pytest.approx([GAIN[s] for s in SEEDS])
    text = (built["out"] / "results.md").read_text().split("# ⚠ Selected on the TEST set")[0]
    assert "| VGG-16 | real | 60.00 [" in text and "55.00 ± 10.00 (FST 6)" in text
    sentence = next(line for line in text.splitlines() if line.startswith("**Did the synthetic images help"))
    assert "ResNet-18 helped, +3.00 points" in sentence and "not shown" not in sentence
    assert "3 seeds are too few" in sentence and "at best 0.25" in sentence


def paired_row(low: float, high: float, n_seeds: int = 5, p: float = 0.0625) -> pd.DataFrame:
    return pd.DataFrame([{"arch": "vgg16", "n_seeds": n_seeds, "dark_accuracy_pct_diff_mean": (low + high) / 2,
                          "dark_accuracy_pct_diff_ci_low": low, "dark_accuracy_pct_diff_ci_high": high,
                          "dark_accuracy_pct_diff_p": p}])


@pytest.mark.parametrize(("low", "high", "verdict"), [
    (-1.5, 4.0, "VGG-16 not shown, +1.25 points"), (0.0, 4.0, "VGG-16 not shown"),  # zero inside or on the edge
    (0.5, 4.0, "VGG-16 helped, +2.25 points"), (-6.0, -2.0, "VGG-16 hurt, -4.00 points")])
def test_the_sentence_says_not_shown_when_the_interval_includes_zero(low, high, verdict):
    per_seed = pd.DataFrame({"n_dark": [56] * 5})
    sentence = results.dark_sentence(1, paired_row(low, high), per_seed, [5, 6])
    assert verdict in sentence and ("not shown" in sentence) == (low <= 0 <= high)
    assert sentence.startswith("**Did the synthetic images help on dark skin?** Scenario 1") and "56 per seed" in sentence
    assert "at best 0.0625" in sentence  # five seeds cannot reach 0.05


def test_the_sentence_says_what_the_seeds_can_show():
    per_seed = pd.DataFrame({"n_dark": [56] * 6})
    assert "the 6 seeds agree (sign-flip p = 0.0312)" in results.dark_sentence(
        1, paired_row(1.0, 3.0, n_seeds=6, p=0.03125), per_seed, [5, 6])
    assert "the 6 seeds leave it open (sign-flip p = 0.41)" in results.dark_sentence(
        1, paired_row(1.0, 3.0, n_seeds=6, p=0.40625), per_seed, [5, 6])
    assert "one seed" in results.dark_sentence(1, paired_row(1.0, 3.0, n_seeds=1, p=np.nan), per_seed, [5, 6])


def test_metrics_json_keeps_the_headline_and_the_rest_goes_to_files_of_their_own(built):
    head = json.loads((built["out"] / "metrics.json").read_text())
    assert set(head) == {"scenario", "selection", *classifiers.ARCHS}
    for arch in classifiers.ARCHS:
        assert set(head[arch]) == {"real", "syn", "real_syn", "gain"}
        assert all(set(head[arch][t]) == {"accuracy_pct", "f1_pct"} for t in config.TRAIN_TYPES)
    gain = head["resnet18"]["gain"]
    assert gain["accuracy_pct"] == pytest.approx(3.0) and 0 < gain["ci_low"] < 3 < gain["ci_high"]
    detail = {name: json.loads((built["out"] / f"metrics_{name}.json").read_text())
              for name in ("intervals", "groups", "ablation")}
    assert {name: set(d) for name, d in detail.items()} == {
        "intervals": {"ci", "paired"}, "groups": {"worst_group"}, "ablation": {"table5"}}
    # every file's columns start with a name of their own: `dvc exp show --drop '^(ci|paired)\.'` takes one file
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    tops = [set(head) - {"scenario", "selection"}, *(set(d) for d in detail.values()), set(params)]
    assert sum(map(len, tops)) == len(set().union(*tops))
    assert detail["groups"]["worst_group"]["vgg16"]["real"] == {"accuracy_pct": 55.0, "fitzpatrick_scale": 6}
    assert detail["intervals"]["paired"]["resnet18"]["p"] == pytest.approx(0.25)
    assert detail["ablation"]["table5"]["txt2img_vanilla"]["gap_pct"] == pytest.approx(-21.0)


def test_the_quality_section_needs_the_quality_stage(tmp_path):
    """--quality-dir without any quality.md under it: one line naming the stage to run."""
    with pytest.raises(SkinaugError, match="run `skinaug quality`"):
        results._quality_section(tmp_path, tmp_path)
