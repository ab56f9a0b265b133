"""Metrics files -> the paper's tables and figures, ours beside the paper's (SPEC §5–7).

    skinaug report metrics/scenario1 reports --ablation-dir metrics/ablation \
        --split-dir data/splits/scenario1/seed0 --images-dir data/images --syn-dir data/synthetic/scenario1/seed0 \
        --tone-dir reports/tone --quality-dir reports/quality/scenario1

Reads every classifier JSON under metrics_dir (and the ablation dir):
    seed{seed}/{arch}_{train_type}.json     the main study (Tables 2–4)
    ablation/{strategy}_{test_name}.json    the ablation (Table 5)
"ours" is the mean ± sample standard deviation (ddof=1, as pandas; blank in CSV for one seed)
over seeds; "paper (reported)" the means printed in the paper. Results selected with the
reference rule (lowest TEST loss) get their own section and file names; they never enter the
honest tables, the headline metrics or the dvc plots.

Beside each metrics JSON lie its per-image predictions ({stem}.predictions.csv); from them come
the 95 % bootstrap intervals, the paired real+syn − real differences with a sign-flip test over seeds,
and the sentence per scenario on dark skin (skinaug.stats). The worst group is the skin type of lowest
accuracy.

Writes into out_dir: results.md (every table), summary.csv (with intervals and worst group),
table_scenario{S}.csv, paired_difference.csv, paired_difference_by_seed.csv,
accuracy_by_skin_type.csv, ablation.csv, metrics.json (the short headline for `dvc exp show`),
metrics_intervals.json, metrics_groups.json, metrics_ablation.json (the rest, one top-level key
each), plots/accuracy.csv (for `dvc plots`) and figures/*.png (8 in wide at 110 dpi: shown 1:1).

Over 300 lines for one idea: results.md's tables and sentences are laid out together so that they
agree; its statistics are report/stats.py's, its figures report/figures.py's, the names it prints
report/names.py's.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from skinaug import SkinaugError, atomic, paper
from skinaug.classify import scoring
from skinaug.config import ARCHS, SELECTION_LABELS, TRAIN_TYPES, Config
from skinaug.data import fitzpatrick
from skinaug.report import figures, stats
from skinaug.report.names import (ARCH_NAMES, METRICS, SCENARIO_CAPTIONS, STRATEGY_NAMES, TRAIN_NAMES, ordered,
                                   paper_accuracy)

KEYS = ["scenario", "selection", "arch", "train_type"]


_ORDER = {"arch": list(ARCHS), "train_type": list(TRAIN_TYPES), "selection": list(SELECTION_LABELS)}


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the paper's order: scenario, selection rule, arch, train type (unknown names last)."""
    def key(column: pd.Series) -> pd.Series:
        order = _ORDER.get(column.name)
        return column.map(lambda v: order.index(v) if v in order else len(order)) if order else column

    columns = [c for c in ("scenario", "selection", "arch", "train_type", "group") if c in df.columns]
    return df.sort_values(columns, key=key, kind="stable").reset_index(drop=True)


# --- reading and aggregating ---------------------------------------------------------------

def load_metrics(*metrics_dirs: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(main study, ablation): one row per classifier JSON, its record kept in column `record`."""
    main, ablation = [], []
    for root, path in sorted((Path(d), p) for d in metrics_dirs for p in Path(d).rglob("*.json")):
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or "confusion_matrix" not in rec:
            continue  # not a classifier's metrics (e.g. a headline metrics.json)
        row = {"scenario": rec["scenario"], "selection": rec["selection"]["rule"], "arch": rec["arch"],
               "train_type": rec["train_type"], "seed": rec["seed"], "test_name": rec["test_name"],
               **{m: rec[m] for m in METRICS}, "record": rec, "predictions": read_predictions(path, rec)}
        if "ablation" in path.relative_to(root).parts[:-1] or root.name == "ablation":  # ablation[/seed{S}]/...
            suffix = "_" + rec["test_name"]
            if not path.stem.endswith(suffix):
                raise SkinaugError(f"{path}: ablation files are named {{strategy}}_{{test_name}}.json")
            ablation.append({**row, "strategy": path.stem[: -len(suffix)]})
        elif path.stem != f"{rec['arch']}_{rec['train_type']}":
            raise SkinaugError(f"{path} holds {rec['arch']} {rec['train_type']}: main-study files are named "
                               "{arch}_{train_type}.json")
        else:
            main.append(row)
    columns = KEYS + ["seed", "test_name", *METRICS, "record", "predictions"]
    return pd.DataFrame(main, columns=columns), pd.DataFrame(ablation, columns=columns + ["strategy"])


def read_predictions(metrics_path: Path, record: dict) -> pd.DataFrame:
    """The per-image predictions beside a classifier's metrics file (classify.predictions_path), as
    class ids (true, pred) beside md5hash and fitzpatrick_scale; they must give the record's accuracy."""
    again = "re-run its classify stage (`dvc repro`)"
    path = scoring.predictions_path(metrics_path)
    if not path.is_file():
        raise SkinaugError(f"{path} not found beside {metrics_path.name} (metrics older than the per-image "
                           f"predictions?): {again}")
    table = fitzpatrick.read_table(path)
    labels = record["labels"]
    unknown = sorted((set(table.label) | set(table.predicted)) - set(labels))
    if unknown or len(table) != record["n_test"]:
        raise SkinaugError(f"{path} does not match {metrics_path.name} ({len(table)} images, labels "
                           f"{', '.join(unknown) or 'known'}): {again}")
    out = pd.DataFrame({"md5hash": table.md5hash, "fitzpatrick_scale": table.fitzpatrick_scale.astype(int),
                        "true": table.label.map(labels.index), "pred": table.predicted.map(labels.index)})
    if not np.isclose(100 * (out.true == out.pred).mean(), record["accuracy_pct"]):
        raise SkinaugError(f"{path} does not give the accuracy of {metrics_path.name}: {again}")
    return out


def summarise(main: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) over seeds of every metric, per scenario × selection × arch × train type."""
    grouped = main.groupby(KEYS)
    out = grouped[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{stat}" for m, stat in out.columns]
    out.insert(0, "n_seeds", grouped.seed.nunique())
    out.insert(1, "seeds", grouped.seed.agg(lambda s: " ".join(map(str, sorted(s)))))
    out = out.reset_index()
    out["paper_accuracy_pct"] = [paper_accuracy(*k) for k in zip(out.scenario, out.arch, out.train_type)]
    return _sorted(out)


def paired_difference(main: pd.DataFrame) -> pd.DataFrame:
    """real+syn − real per seed (the same split for both), then mean and sample std over seeds."""
    wide = main.pivot_table(index=["scenario", "selection", "arch", "seed"], columns="train_type",
                            values=["accuracy_pct", "f1_pct"])
    rows = []
    for (scenario, selection, arch), g in wide.groupby(level=[0, 1, 2]):
        if not {"real", "real_syn"} <= set(g.columns.get_level_values(1)):
            continue
        row = {"scenario": scenario, "selection": selection, "arch": arch}
        for m in ("accuracy_pct", "f1_pct"):
            d = (g[(m, "real_syn")] - g[(m, "real")]).dropna()
            row |= {"n_seeds": len(d), f"{m}_diff_mean": d.mean(), f"{m}_diff_std": d.std()}
        row["paper_accuracy_pct_diff"] = paper_accuracy(scenario, arch, "real_syn") - paper_accuracy(scenario, arch, "real")
        rows.append(row)
    return _sorted(pd.DataFrame(rows, columns=["scenario", "selection", "arch", "n_seeds", "accuracy_pct_diff_mean",
                                               "accuracy_pct_diff_std", "f1_pct_diff_mean", "f1_pct_diff_std",
                                               "paper_accuracy_pct_diff"]))


def by_skin_type(main: pd.DataFrame, light: list[int], dark: list[int]) -> pd.DataFrame:
    """Accuracy per fitzpatrick_scale of the test images, and light − dark where a test set has both."""
    rows = []
    for r in main.itertuples():
        acc = {int(k): v for k, v in r.record["accuracy_pct_by_fitzpatrick_scale"].items()}
        n = {int(k): v for k, v in r.record["n_test_by_fitzpatrick_scale"].items()}
        groups = {f"FST {s}": a for s, a in acc.items()}
        if any(s in light for s in acc) and any(s in dark for s in acc):
            groups["light − dark gap"] = _pooled(acc, n, light) - _pooled(acc, n, dark)
        rows += [{**{k: getattr(r, k) for k in KEYS}, "seed": r.seed, "group": g, "accuracy_pct": a}
                 for g, a in groups.items()]
    long = pd.DataFrame(rows, columns=KEYS + ["seed", "group", "accuracy_pct"])
    out = long.groupby(KEYS + ["group"]).agg(accuracy_pct_mean=("accuracy_pct", "mean"),
                                               accuracy_pct_std=("accuracy_pct", "std"), n_seeds=("seed", "nunique"))
    return _sorted(out.reset_index())


def _pooled(acc: dict, n: dict, scales: list[int]) -> float:
    """Accuracy over the test images whose skin type is in `scales`."""
    kept = [s for s in acc if s in scales]
    return sum(acc[s] * n[s] for s in kept) / sum(n[s] for s in kept)


def ablation_table(ablation: pd.DataFrame, resamples: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Table 5: accuracy on the light and the dark flexible sets per strategy, mean and sample std
    over seeds (the light − dark gap taken per seed first), paper beside; 95 % intervals over the
    test images of the light, dark and gap means; the worst group (lowest accuracy among the skin
    types of both sets, per seed, then mean)."""
    columns = ["selection", "strategy", "scenario", "n_test", "arch", "epochs", "n_seeds", "seeds"]
    columns += [f"{m}_{stat}" for m in ("accuracy_pct_light", "accuracy_pct_dark", "gap_light_minus_dark")
                for stat in ("mean", "std")]
    columns += ["paper_accuracy_pct_light", "paper_accuracy_pct_dark"]
    columns += [f"{m}_ci_{e}" for m in ("light", "dark", "gap") for e in ("low", "high")]
    columns += ["worst_group_pct_mean", "worst_group_pct_std", "worst_group_fitzpatrick_scale"]
    rows = []
    for (selection, strategy), g in ablation.groupby(["selection", "strategy"], sort=False):
        per_seed = g.pivot_table(index="seed", columns="test_name", values="accuracy_pct")
        light = per_seed.get("flex_light", pd.Series(np.nan, index=per_seed.index))
        dark = per_seed.get("flex_dark", pd.Series(np.nan, index=per_seed.index))
        reported = paper.ABLATION.get(strategy, (np.nan, np.nan))
        sizes = g.groupby("test_name").record.first().map(lambda r: r["n_test"])
        row = {"selection": selection, "strategy": strategy, "scenario": g.scenario.iloc[0],
               "n_test": " / ".join(f"{k} {v}" for k, v in sizes.items()), "arch": g.arch.iloc[0],
               "epochs": g.record.iloc[0]["epochs"],
               "n_seeds": len(per_seed), "seeds": " ".join(map(str, sorted(per_seed.index))),
               "paper_accuracy_pct_light": reported[0], "paper_accuracy_pct_dark": reported[1]}
        for name, values in (("accuracy_pct_light", light), ("accuracy_pct_dark", dark),
                             ("gap_light_minus_dark", light - dark)):
            row |= {f"{name}_mean": values.mean(), f"{name}_std": values.std()}
        sets = {name: g[g.test_name == name].sort_values("seed") for name in ("flex_light", "flex_dark")}
        if len(sets["flex_light"]) and len(sets["flex_dark"]):
            row |= stats.light_dark(list(sets["flex_light"].predictions), list(sets["flex_dark"].predictions),
                                    len(g.record.iloc[0]["labels"]), resamples, seed)
        worst = [stats.worst_group({int(s): a for r in runs.record  # both test sets of the seed
                                    for s, a in r["accuracy_pct_by_fitzpatrick_scale"].items()})
                 for _, runs in g.groupby("seed")]
        row |= {"worst_group_pct_mean": np.mean([a for _, a in worst]),
                "worst_group_pct_std": np.std([a for _, a in worst], ddof=1) if len(worst) > 1 else np.nan,
                "worst_group_fitzpatrick_scale": stats.most_frequent(w for w, _ in worst)}
        rows.append(row)
    order = {s: i for i, s in enumerate(paper.ABLATION)}
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values("strategy", key=lambda s: s.map(lambda x: order.get(x, len(order))), kind="stable")


# --- markdown --------------------------------------------------------------------------------

def cell(mean: float, std: float, n: int) -> str:
    if n == 0 or pd.isna(mean):
        return "–"  # no run
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (n=1)"


def markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def paper_layout(summary: pd.DataFrame) -> pd.DataFrame:
    """Rows arch; columns real / syn / real+syn for each metric (the layout of the paper's Tables 2–4)."""
    rows = []
    for arch in ordered(summary.arch, ARCHS):
        row = {"Model": ARCH_NAMES.get(arch, arch)}
        for m, name in METRICS.items():
            for t in TRAIN_TYPES:
                s = summary[(summary.arch == arch) & (summary.train_type == t)]
                row[f"{name} {TRAIN_NAMES[t]}"] = cell(*s[[f"{m}_mean", f"{m}_std", "n_seeds"]].iloc[0]) if len(s) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def paper_beside_ours(summary: pd.DataFrame, scenario: int) -> pd.DataFrame:
    rows = []
    for arch in ordered(summary.arch, ARCHS):
        row = {"Model": ARCH_NAMES.get(arch, arch)}
        for t in TRAIN_TYPES:
            s = summary[(summary.arch == arch) & (summary.train_type == t)]
            reported = paper_accuracy(scenario, arch, t)
            row[f"{TRAIN_NAMES[t]} paper (reported)"] = "–" if np.isnan(reported) else f"{reported:.2f}"
            row[f"{TRAIN_NAMES[t]} ours"] = cell(*s[["accuracy_pct_mean", "accuracy_pct_std", "n_seeds"]].iloc[0]) if len(s) else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def _scenario_section(scenario: int, selection: str, main, summary, paired, per_seed, skin, dark: list[int]) -> str:
    def pick(df: pd.DataFrame) -> pd.DataFrame:
        return df[(df.scenario == scenario) & (df.selection == selection)]

    summary, paired, per_seed, skin, runs = pick(summary), pick(paired), pick(per_seed), pick(skin), pick(main)
    seeds = sorted(set(runs.seed))
    facts = (f"Model selection: **{SELECTION_LABELS[selection]}** · {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) · "
             f"test set {', '.join(sorted(set(runs.test_name)))} ({int(runs.record.iloc[0]['n_test'])} images) · "
             f"profile {', '.join(sorted({r['profile'] for r in runs.record}))}\n")
    out = [f"## Scenario {scenario}: {SCENARIO_CAPTIONS.get(scenario, '')}\n", facts]
    if len(paired):
        out.append(dark_sentence(scenario, paired, per_seed, dark) + "\n")
    out += [f"### {paper.TABLES.get(scenario, 'Table')} layout — ours\n", markdown(paper_layout(summary)),
            "\n### Accuracy: paper (reported) beside ours\n", markdown(paper_beside_ours(summary, scenario)),
            "\n### How sure, and for whom: 95 % intervals over the test images, worst-served skin type\n",
            "Mean over seeds [95 % percentile bootstrap interval: each seed's test images drawn with replacement, "
            "the mean recomputed]. Worst group: the lowest accuracy among the test images' skin types, per seed, "
            "then mean ± std (the type most often lowest).\n\n", markdown(uncertainty_layout(summary, skin))]
    if len(paired):
        table = pd.DataFrame({
            "Model": [ARCH_NAMES.get(a, a) for a in paired.arch],
            "Δ accuracy ours": [cell(m, s, n) for m, s, n in zip(paired.accuracy_pct_diff_mean, paired.accuracy_pct_diff_std, paired.n_seeds)],
            "95 % CI": [interval_cell(lo, hi) for lo, hi in zip(paired.accuracy_pct_diff_ci_low, paired.accuracy_pct_diff_ci_high)],
            "sign-flip p over seeds": [p_cell(p, n) for p, n in zip(paired.accuracy_pct_diff_p, paired.n_seeds)],
            "Δ F1 ours": [cell(m, s, n) for m, s, n in zip(paired.f1_pct_diff_mean, paired.f1_pct_diff_std, paired.n_seeds)],
            "Δ F1 95 % CI": [interval_cell(lo, hi) for lo, hi in zip(paired.f1_pct_diff_ci_low, paired.f1_pct_diff_ci_high)],
            "Δ accuracy paper (reported means)": ["–" if np.isnan(d) else f"{d:.2f}" for d in paired.paper_accuracy_pct_diff]})
        by_seed = pd.DataFrame({
            "Model": [ARCH_NAMES.get(a, a) for a in per_seed.arch], "Seed": per_seed.seed,
            "Δ accuracy [95 % CI]": [f"{d:+.2f} {interval_cell(lo, hi)}" for d, lo, hi in zip(
                per_seed.accuracy_pct_diff, per_seed.accuracy_pct_diff_ci_low, per_seed.accuracy_pct_diff_ci_high)],
            "Δ F1 [95 % CI]": [f"{d:+.2f} {interval_cell(lo, hi)}" for d, lo, hi in zip(
                per_seed.f1_pct_diff, per_seed.f1_pct_diff_ci_low, per_seed.f1_pct_diff_ci_high)],
            "Δ accuracy on dark images": [f"{d:+.2f} (n={n})" if n else "– (none)"
                                          for d, n in zip(per_seed.dark_accuracy_pct_diff, per_seed.n_dark)]})
        out += ["\n### Paired difference real+syn − real (per seed, then mean ± std)\n",
                "The interval draws the same test images for both classifiers of a seed. The sign-flip test "
                "compares the per-seed differences with zero over all 2^n sign patterns (two-sided); "
                "n seeds cannot give p below 2 / 2^n (5 seeds: 0.0625).\n\n", markdown(table),
                "\nPer seed:\n\n", markdown(by_seed)]
    if len(skin):
        groups = ordered(skin.group, [f"FST {s}" for s in range(1, 7)] + ["light − dark gap"])
        rows = []
        for (arch, t), g in skin.groupby(["arch", "train_type"], sort=False):
            row = {"Model": ARCH_NAMES.get(arch, arch), "Train": TRAIN_NAMES.get(t, t)}
            for grp in groups:
                s = g[g.group == grp]
                row[grp] = cell(*s[["accuracy_pct_mean", "accuracy_pct_std", "n_seeds"]].iloc[0]) if len(s) else "–"
            rows.append(row)
        out += ["\n### Accuracy per skin type of the test images (fitzpatrick_scale)\n", markdown(pd.DataFrame(rows))]
    return "\n".join(out)


def interval_cell(low: float, high: float) -> str:
    return "–" if pd.isna(low) else f"[{low:.2f}, {high:.2f}]"


def p_cell(p: float, n_seeds: int) -> str:
    if n_seeds < 2 or pd.isna(p):
        return "– (one seed)"
    return f"{p:.3g} (≥ {stats.smallest_p(n_seeds):.3g} with {n_seeds})"


def uncertainty_layout(summary: pd.DataFrame, skin: pd.DataFrame) -> pd.DataFrame:
    """Per arch × train type: accuracy and macro F1 with their intervals, the worst group, and the
    light − dark gap where the test set has both."""
    gaps = skin[skin.group == "light − dark gap"].set_index(["arch", "train_type"])
    rows = []
    for r in summary.itertuples():
        row = {"Model": ARCH_NAMES.get(r.arch, r.arch), "Train": TRAIN_NAMES.get(r.train_type, r.train_type),
               "Accuracy [95 % CI]": f"{r.accuracy_pct_mean:.2f} {interval_cell(r.accuracy_pct_ci_low, r.accuracy_pct_ci_high)}",
               "Macro F1 [95 % CI]": f"{r.f1_pct_mean:.2f} {interval_cell(r.f1_pct_ci_low, r.f1_pct_ci_high)}",
               "Worst group": f"{cell(r.worst_group_pct_mean, r.worst_group_pct_std, r.n_seeds)} "
                              f"(FST {r.worst_group_fitzpatrick_scale})"}
        if len(gaps):
            g = gaps.loc[(r.arch, r.train_type)] if (r.arch, r.train_type) in gaps.index else None
            row["light − dark"] = "–" if g is None else cell(g.accuracy_pct_mean, g.accuracy_pct_std, g.n_seeds)
        rows.append(row)
    return pd.DataFrame(rows)


def dark_sentence(scenario: int, paired: pd.DataFrame, per_seed: pd.DataFrame, dark: list[int]) -> str:
    """One sentence from the numbers: did real+syn beat real on the dark test images, and how sure.

    "helped" / "hurt" when the 95 % interval of the mean difference (over test images) lies above /
    below zero, "not shown" when it includes zero; then what the seeds say (sign-flip test)."""
    alpha = 1 - stats.CONFIDENCE
    counts = sorted(set(per_seed.n_dark))
    size = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    parts = []
    for r in paired.itertuples():
        name, n = ARCH_NAMES.get(r.arch, r.arch), r.n_seeds
        mean, low, high, p = (r.dark_accuracy_pct_diff_mean, r.dark_accuracy_pct_diff_ci_low,
                              r.dark_accuracy_pct_diff_ci_high, r.dark_accuracy_pct_diff_p)
        if pd.isna(mean):
            parts.append(f"{name}: no dark test images to tell")
            continue
        verdict = "not shown" if pd.isna(low) or low <= 0 <= high else ("helped" if low > 0 else "hurt")
        if n < 2:
            seeds = "one seed, so nothing to say across seeds"
        elif stats.smallest_p(n) > alpha:
            seeds = (f"{n} seeds are too few for the sign-flip test to reach p < {alpha:g} "
                     f"(p = {p:.2f}, at best {stats.smallest_p(n):.3g})")
        elif p < alpha:
            seeds = f"the {n} seeds agree (sign-flip p = {p:.3g})"
        else:
            seeds = f"the {n} seeds leave it open (sign-flip p = {p:.2f})"
        parts.append(f"{name} {verdict}, {mean:+.2f} points (95 % CI {interval_cell(low, high)} over test images; {seeds})")
    skin_types = ", ".join(map(str, dark))
    return (f"**Did the synthetic images help on dark skin?** Scenario {scenario}, accuracy of real+syn − real on the "
            f"dark test images (FST {skin_types}; {size} per seed): " + "; ".join(parts) + ".")


def _fmt(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.2f}"


def _ablation_section(table: pd.DataFrame) -> str:
    def cells(name: str) -> list[str]:
        return [cell(m, sd, n) for m, sd, n in zip(table[f"{name}_mean"], table[f"{name}_std"], table.n_seeds)]

    shown = pd.DataFrame({
        "Strategy": [STRATEGY_NAMES.get(s, s) for s in table.strategy],
        "light ours": cells("accuracy_pct_light"), "dark ours": cells("accuracy_pct_dark"),
        "light − dark ours": cells("gap_light_minus_dark"),
        "light − dark 95 % CI": [interval_cell(lo, hi) for lo, hi in zip(table.gap_ci_low, table.gap_ci_high)],
        "worst group": [f"{cell(m, sd, n)} (FST {w})" for m, sd, n, w in zip(
            table.worst_group_pct_mean, table.worst_group_pct_std, table.n_seeds, table.worst_group_fitzpatrick_scale)],
        "light paper (reported)": table.paper_accuracy_pct_light.map(_fmt),
        "dark paper (reported)": table.paper_accuracy_pct_dark.map(_fmt)})
    first = table.iloc[0]
    seeds = sorted({s for row in table.seeds for s in row.split()}, key=int)
    warning = " — ⚠ selected on the TEST set (reference rule)" if first.selection == "test_reference" else ""
    chosen = (" The reference rule chose the epoch on each test set separately." if first.selection == "test_reference"
              else "")
    epochs = f"{first.epochs} epoch{'s' if first.epochs != 1 else ''}"
    return (f"## Ablation (Table 5): scenario {first.scenario}, {ARCH_NAMES.get(first.arch, first.arch)} "
            f"trained on synthetic images only for {epochs}, seeds {', '.join(seeds)}{warning}\n\n"
            f"Accuracy on the light and the dark flexible sets ({first.n_test}), mean ± sample std over seeds "
            f"(the gap per seed first); the gap's 95 % interval draws each set's images with replacement; worst "
            f"group: the lowest accuracy among the skin types of both sets, per seed. Model selection: "
            f"**{SELECTION_LABELS[first.selection]}**.{chosen}\n\n"
            + markdown(shown))


# --- the stage -------------------------------------------------------------------------------

def _round(value) -> float | None:
    """A metric for JSON: 4 decimals, None (null) for a missing number."""
    return None if pd.isna(value) else round(float(value), 4)


def _cells(out: dict, selection: str) -> dict:
    """Where a metrics file's numbers go: test-selected runs (the reference rule) never stand under
    the honest names, so `dvc exp show` columns say what they are."""
    return out.setdefault("test_reference", {}) if selection == "test_reference" else out


def headline(summary: pd.DataFrame, paired: pd.DataFrame, scenario: int, selection: str) -> dict:
    """reports/metrics.json, the short set `dvc exp show` shows: {"scenario", "selection", arch:
    {train_type: {"accuracy_pct", "f1_pct"}, "gain": {"accuracy_pct", "ci_low", "ci_high"}}}: means
    over seeds, and real+syn − real accuracy with its 95 % interval. The rest: detail_metrics.

    When test-selected runs are all there is, they go under a "test_reference" key.
    """
    out = {"scenario": scenario, "selection": selection}
    cells = _cells(out, selection)
    for r in summary[(summary.scenario == scenario) & (summary.selection == selection)].itertuples():
        cells.setdefault(r.arch, {})[r.train_type] = {"accuracy_pct": _round(r.accuracy_pct_mean),
                                                      "f1_pct": _round(r.f1_pct_mean)}
    for r in paired[(paired.scenario == scenario) & (paired.selection == selection)].itertuples():
        cells.setdefault(r.arch, {})["gain"] = {"accuracy_pct": _round(r.accuracy_pct_diff_mean),
                                                "ci_low": _round(r.accuracy_pct_diff_ci_low),
                                                "ci_high": _round(r.accuracy_pct_diff_ci_high)}
    return out


def detail_metrics(summary: pd.DataFrame, paired: pd.DataFrame, ablation: pd.DataFrame, scenario: int,
                   selection: str) -> dict[str, dict]:
    """The metrics beyond the headline, one file each (reports/metrics_{name}.json), each under a
    top-level key of its own so that `dvc exp show --drop`/`--keep` can take or leave a file's columns:

    intervals: {"ci": {arch: {train_type: {accuracy_low, accuracy_high, f1_low, f1_high}}},
                "paired": {arch: {p, p_smallest, n_seeds, f1_pct, f1_low, f1_high,
                                  dark_accuracy_pct, dark_low, dark_high, dark_p}}}
    groups:    {"worst_group": {arch: {train_type: {accuracy_pct, fitzpatrick_scale}}}}
    ablation:  {"table5": {strategy: {light_pct, dark_pct, gap_pct, gap_low, gap_high, worst_group_pct}}}
    """
    intervals, groups, table5 = {}, {}, {}
    for r in summary[(summary.scenario == scenario) & (summary.selection == selection)].itertuples():
        _cells(intervals, selection).setdefault("ci", {}).setdefault(r.arch, {})[r.train_type] = {
            "accuracy_low": _round(r.accuracy_pct_ci_low), "accuracy_high": _round(r.accuracy_pct_ci_high),
            "f1_low": _round(r.f1_pct_ci_low), "f1_high": _round(r.f1_pct_ci_high)}
        _cells(groups, selection).setdefault("worst_group", {}).setdefault(r.arch, {})[r.train_type] = {
            "accuracy_pct": _round(r.worst_group_pct_mean),
            "fitzpatrick_scale": int(r.worst_group_fitzpatrick_scale)}
    for r in paired[(paired.scenario == scenario) & (paired.selection == selection)].itertuples():
        _cells(intervals, selection).setdefault("paired", {})[r.arch] = {
            "p": _round(r.accuracy_pct_diff_p), "p_smallest": _round(r.p_smallest), "n_seeds": int(r.n_seeds),
            "f1_pct": _round(r.f1_pct_diff_mean), "f1_low": _round(r.f1_pct_diff_ci_low),
            "f1_high": _round(r.f1_pct_diff_ci_high), "dark_accuracy_pct": _round(r.dark_accuracy_pct_diff_mean),
            "dark_low": _round(r.dark_accuracy_pct_diff_ci_low), "dark_high": _round(r.dark_accuracy_pct_diff_ci_high),
            "dark_p": _round(r.dark_accuracy_pct_diff_p)}
    if len(ablation):
        kept = ablation[ablation.selection != "test_reference"]
        kept = kept if len(kept) else ablation
        for r in kept[kept.selection == kept.selection.iloc[0]].itertuples():
            _cells(table5, r.selection).setdefault("table5", {})[r.strategy] = {
                "light_pct": _round(r.accuracy_pct_light_mean), "dark_pct": _round(r.accuracy_pct_dark_mean),
                "gap_pct": _round(r.gap_light_minus_dark_mean), "gap_low": _round(r.gap_ci_low),
                "gap_high": _round(r.gap_ci_high), "worst_group_pct": _round(r.worst_group_pct_mean)}
    return {"intervals": intervals, "groups": groups, "ablation": table5}


def plot_rows(summary: pd.DataFrame, scenario: int, selection: str) -> pd.DataFrame:
    """plots/accuracy.csv (`dvc plots`): one bar per arch × train type; test-selected ones say so."""
    plot = summary[(summary.scenario == scenario) & (summary.selection == selection)]
    mark = " (TEST-selected, reference rule)" if selection == "test_reference" else ""
    return pd.DataFrame({
        "model": [f"{ARCH_NAMES.get(a, a)} {TRAIN_NAMES[t]}{mark}" for a, t in zip(plot.arch, plot.train_type)],
        "accuracy_pct": plot.accuracy_pct_mean.round(4), "f1_pct": plot.f1_pct_mean.round(4)})


def _suffix(selection: str, primary: str) -> str:
    return "" if selection == primary else f"_{selection}"


def _tone_section(tone_dir: Path, out_dir: Path) -> str:
    """The skin-tone check (`skinaug tone`): its summary rows and its figure, linked from results.md."""
    summary = tone_dir / "tone_summary.csv"
    if not summary.is_file():
        raise SkinaugError(f"no {summary}: run `skinaug tone` (the tone stage) before the report")
    figure = Path(os.path.relpath(tone_dir / "tone.png", out_dir)).as_posix()
    return ("\n## Skin tone of real and synthetic images\n\n"
            "ITA of the skin (degrees; lower is darker) per group and Fitzpatrick type. Synthetic images are "
            "listed by the type their prompt asked for, those made from light sources (the method's work) "
            "apart from those of dark sources (which keep their own type). `in_band_pct`: share within that "
            "type's ITA band.\n\n"
            + markdown(pd.read_csv(summary)) + f"\n\n![Skin tone of real and synthetic images]({figure})\n")


def _quality_section(quality_dir: Path, out_dir: Path) -> str:
    """Every quality.md under quality_dir (`skinaug quality`: one per seed), in path order, its figure
    links made relative to out_dir, where results.md lies."""
    pages = sorted(Path(quality_dir).rglob("quality.md"))
    if not pages:
        raise SkinaugError(f"no quality.md under {quality_dir}: run `skinaug quality` (the quality stage) "
                           "before the report")
    parts = []
    for page in pages:
        rel = Path(os.path.relpath(page.parent, out_dir)).as_posix()
        parts.append(re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({rel}/{m.group(1)})", page.read_text()))
    return "\n" + "\n".join(parts)


def build_report(metrics_dir: Path, out_dir: Path, cfg: Config, split_dir: Path | None = None,
                 images_dir: Path | None = None, syn_dir: Path | None = None, tone_dir: Path | None = None,
                 ablation_dir: Path | None = None, quality_dir: Path | None = None) -> dict:
    """Write every table and figure into out_dir; return the headline metrics."""
    out_dir = Path(out_dir)
    main, ablation = load_metrics(metrics_dir, *([ablation_dir] if ablation_dir is not None else []))
    if main.empty and ablation.empty:
        raise SkinaugError(f"no classifier metrics under {metrics_dir}: run the classify stages first")
    draws = (cfg.report.bootstrap, cfg.report.bootstrap_seed)
    summary = summarise(main).merge(stats.row_intervals(main, KEYS, *draws), on=KEYS, how="left")
    over_seeds, per_seed = stats.paired_tests(main, KEYS[:3], cfg.splits.dark, *draws)
    repeated = [f"{m}_diff_mean" for m in stats.METRICS] + ["n_seeds"]
    paired = paired_difference(main).merge(over_seeds.drop(columns=repeated), on=KEYS[:3], how="left")
    per_seed = _sorted(per_seed)
    skin = by_skin_type(main, cfg.splits.light, cfg.splits.dark)
    ab = ablation_table(ablation, *draws)
    honest = [s for s in SELECTION_LABELS if s != "test_reference"]
    primary = cfg.classify.selection if cfg.classify.selection in honest else "last"
    chosen = next((s for s in [cfg.classify.selection, *honest, "test_reference"]
                   if s in set(main[main.scenario == cfg.scenario].selection)), cfg.classify.selection)

    text = ["# Results\n",
            ("All numbers are percentages on the test images. **ours**: mean ± sample standard deviation "
             "(ddof=1) over seeds, `(n=1)` for a single run; **paper (reported)**: the paper's means "
             "(Wang et al., MICCAI ISIC 2024). Precision, recall and F1 are macro averages over the labels. "
             f"Intervals: 95 % percentile bootstrap over the test images, {cfg.report.bootstrap:,} resamples "
             f"(report.bootstrap, seeded by report.bootstrap_seed {cfg.report.bootstrap_seed}).\n")]
    if main.record.map(lambda r: r["profile"] != "paper").any() or ablation.record.map(lambda r: r["profile"] != "paper").any():
        text.append("_Runs from the demo profile (a small stand-in study): the paper's numbers are shown for "
                    "layout, not as a target._\n")
    sections = sorted({(s, sel) for s, sel in zip(main.scenario, main.selection)},
                      key=lambda k: (k[1] == "test_reference", k[0], k[1]))
    leaky_header = ("\n# ⚠ Selected on the TEST set — reference rule, not comparable\n\n"
                    "The results below keep the epoch with the lowest **test** loss after epoch 10, as the "
                    "reference code does. The test set chose the model, so these numbers overstate accuracy; "
                    "they are here only to compare with the paper.\n")
    for scenario, selection in sections:
        if selection == "test_reference" and leaky_header:
            text.append(leaky_header)
            leaky_header = ""
        text.append(_scenario_section(scenario, selection, main, summary, paired, per_seed, skin, cfg.splits.dark))
        suffix = _suffix(selection, primary)
        runs = main[(main.scenario == scenario) & (main.selection == selection)]
        part = summary[(summary.scenario == scenario) & (summary.selection == selection)]
        atomic.write_csv(out_dir / f"table_scenario{scenario}{suffix}.csv", paper_layout(part))
        figures.metrics_figure(part, scenario, selection, out_dir / "figures" / f"metrics_scenario{scenario}{suffix}.png")
        figures.confusion_figure(runs, scenario, selection, out_dir / "figures" / f"confusion_scenario{scenario}{suffix}.png")
    for selection in ordered(ab.selection, honest + ["test_reference"]):
        text.append(_ablation_section(ab[ab.selection == selection]))
    if any(d is not None for d in (split_dir, images_dir, syn_dir)):
        if None in (split_dir, images_dir, syn_dir):
            raise SkinaugError("the real-vs-synthetic figure needs --split-dir, --images-dir and --syn-dir together")
        figures.pairs_figure(split_dir, images_dir, syn_dir, cfg.subset.labels, out_dir / "figures" / "real_vs_synthetic.png")
        text.append("\n![Real training images beside their synthetic versions](figures/real_vs_synthetic.png)\n")
    if tone_dir is not None:
        text.append(_tone_section(Path(tone_dir), out_dir))
    if quality_dir is not None:
        text.append(_quality_section(Path(quality_dir), out_dir))

    atomic.write_text(out_dir / "results.md", "\n".join(text))
    atomic.write_csv(out_dir / "summary.csv", summary)
    atomic.write_csv(out_dir / "paired_difference.csv", paired)
    atomic.write_csv(out_dir / "paired_difference_by_seed.csv", per_seed)
    atomic.write_csv(out_dir / "accuracy_by_skin_type.csv", skin)
    atomic.write_csv(out_dir / "ablation.csv", ab)
    head = headline(summary, paired, cfg.scenario, chosen)
    atomic.write_csv(out_dir / "plots" / "accuracy.csv", plot_rows(summary, cfg.scenario, chosen))
    atomic.write_json(out_dir / "metrics.json", head)
    for name, content in detail_metrics(summary, paired, ab, cfg.scenario, chosen).items():
        atomic.write_json(out_dir / f"metrics_{name}.json", content)
    return head
