"""A sweep over the generator's settings, read back from finished DVC experiments.

    dvc exp run --queue -S 'generate.strength=0.3,0.5,0.7'   # one experiment per value
    dvc exp run --run-all                                      # run the queue
    skinaug sweep-report reports/sweep                         # -> sweep.md, sweep.csv, sweep.png

For each finished experiment `dvc exp show --json` gives its name, commit and params; the
commit holds each classifier's metrics JSON (metrics/scenario{S}/seed{seed}/*.json, outputs
kept in git) and the tone check's per-image table (reports/tone/tone.csv). Per swept value, the
report gives each classifier's accuracy on the dark-skin test images (splits.dark) as the mean
and sample std over seeds with every seed's value, the tone shift (median ITA of the synthetic
images made from light sources minus that of the real light images, in degrees: negative is
darker; report.seed's images only, so no spread) and the share of those synthetic images whose
ITA lies in their target type's band. A metric named lesion_kept_pct in the experiment's
metrics files (the quality stage's, one per seed) is added, as their mean over seeds, as a column
and a panel when present.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from skinaug import SkinaugError, atomic
from skinaug.report.figures import COLOURS
from skinaug.report.names import ARCH_NAMES, TRAIN_NAMES

SWEEPABLE = ("generate.strength", "generate.guidance", "generate.per_source", "generate.max_per_label")
QUALITY_KEY = "lesion_kept_pct"  # a quality stage's metric, reported when an experiment has it
TONE_CSV = "reports/tone/tone.csv"
FINISHED = (None, "success")  # executor states of a finished experiment (None: run in the workspace)

Reader = Callable[[str, str], bytes | None]  # (commit, path) -> the file's bytes at that commit, or None
Lister = Callable[[str, str], list[str]]  # (commit, folder) -> paths of the files under it at that commit


# --- dvc exp show --json -> experiments ------------------------------------------------------

def experiments(shown) -> list[dict]:
    """The finished experiments of a `dvc exp show --json` document: [{name, rev, params, metrics}].

    DVC 3 writes a list of baseline rows, each with "experiments": [{"name", "revs": [...],
    "executor"}]; DVC 2 a dict {baseline sha: {"baseline": ..., exp sha: {"data": ...}}}. Queued,
    running and failed experiments are skipped, as are the baselines and the workspace.
    """
    found = []
    if isinstance(shown, dict):  # DVC 2
        for baseline, revs in shown.items():
            for rev, entry in (revs or {}).items():
                if baseline != "workspace" and rev != "baseline":
                    found.append(_experiment(rev, entry.get("data") or {}, entry.get("data", {}).get("name") or rev))
    else:
        for row in shown or []:
            for exp in row.get("experiments") or []:
                state = (exp.get("executor") or {}).get("state")
                for rev in exp.get("revs") or []:
                    if state in FINISHED and rev.get("data") and not rev.get("error"):
                        found.append(_experiment(rev["rev"], rev["data"], rev.get("name") or exp.get("name")))
    return [e for e in found if e["params"]]


def _experiment(rev: str, data: dict, name: str) -> dict:
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    metrics = {path: entry.get("data") or {} for path, entry in (data.get("metrics") or {}).items()}
    return {"name": name or rev[:7], "rev": rev, "params": flatten(params), "metrics": metrics}


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"generate": {"strength": 0.5}} -> {"generate.strength": 0.5}; lists stay values."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def swept_param(exps: list[dict], param: str | None) -> str:
    """The param the experiments differ in: `param` if given, else the one of SWEEPABLE that varies."""
    if param is not None:
        missing = [e["name"] for e in exps if param not in e["params"]]
        if missing:
            raise SkinaugError(f"{param} is not a param of experiment(s) {', '.join(missing)}; "
                               f"name a params.yaml key, e.g. {SWEEPABLE[0]}")
        return param
    varying = [p for p in SWEEPABLE if len({json.dumps(e["params"].get(p)) for e in exps}) > 1]
    if len(varying) != 1:
        raise SkinaugError(f"the experiments vary in {', '.join(varying) or 'none of ' + ', '.join(SWEEPABLE)}; "
                           "name the swept param with --param")
    return varying[0]


# --- per experiment: metrics at its commit ------------------------------------------------------

def dark_accuracy(record: dict, dark: list[int]) -> float:
    """Accuracy (%) over the record's test images of the dark skin types, pooled over those types."""
    acc, n = record["accuracy_pct_by_fitzpatrick_scale"], record["n_test_by_fitzpatrick_scale"]
    types = [str(t) for t in dark if str(t) in acc and n.get(str(t), 0) > 0]
    if not types:
        return float("nan")
    return sum(acc[t] * n[t] for t in types) / sum(n[t] for t in types)


def tone_shift(tone: pd.DataFrame) -> tuple[float, float]:
    """(median ITA of synthetic-from-light minus real light, % of those synthetic images in their band)."""
    syn, light = tone[tone.group == "synthetic from light"], tone[tone.group == "real light"]
    if syn.empty or light.empty:
        return float("nan"), float("nan")
    in_band = syn.in_band.astype(str).str.lower() == "true"
    return float(syn.ita.median() - light.ita.median()), float(100 * in_band.mean())


def quality(metrics: dict) -> float:
    """The experiment's QUALITY_KEY: the mean over the metrics files that hold it (one per seed,
    reports/quality/scenario{S}/metrics_seed{N}.json), NaN when none does."""
    found = [float(value) for data in metrics.values() for key, value in flatten(data).items()
             if key.split(".")[-1] == QUALITY_KEY and isinstance(value, (int, float))]
    return sum(found) / len(found) if found else float("nan")


def runs(exps: list[dict], param: str, read: Reader, listdir: Lister) -> pd.DataFrame:
    """One row per (experiment, classifier, seed): swept value, dark-skin accuracy, tone, quality."""
    rows = []
    for e in exps:
        p = e["params"]
        scenario, dark = p["scenario"], list(p["splits.dark"])
        shift, in_band = float("nan"), float("nan")
        tone = read(e["rev"], TONE_CSV)
        if tone is not None:
            shift, in_band = tone_shift(pd.read_csv(io.BytesIO(tone)))
        paths = sorted(f for f in listdir(e["rev"], f"metrics/scenario{scenario}") if f.endswith(".json"))
        if not paths:
            raise SkinaugError(f"experiment {e['name']} has no classifier metrics under metrics/scenario{scenario}; "
                               "did it finish? (`dvc exp show`)")
        for path in paths:
            record = json.loads(read(e["rev"], path))
            rows.append({"param": param, "value": p[param], "experiment": e["name"], "scenario": scenario,
                         "arch": record["arch"], "train_type": record["train_type"], "seed": record["seed"],
                         "dark_accuracy_pct": dark_accuracy(record, dark), "tone_shift_deg": shift,
                         "syn_in_band_pct": in_band, QUALITY_KEY: quality(e["metrics"])})
    df = pd.DataFrame(rows)
    if df.scenario.nunique() > 1:
        raise SkinaugError(f"the experiments span scenarios {sorted(df.scenario.unique())}; "
                           "pick one scenario's with --exp")
    twice = df[df.duplicated(["value", "arch", "train_type", "seed"], keep=False)]
    if not twice.empty:
        r = twice.iloc[0]
        raise SkinaugError(f"{param}={r.value} seed {r.seed} ran in more than one experiment "
                           f"({', '.join(sorted(set(twice.experiment)))}); pick one each with --exp")
    return df


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per swept value and classifier: dark-skin accuracy mean, sample std and each seed's, tone, quality."""
    out = []
    for (value, arch, train_type), g in df.groupby(["value", "arch", "train_type"], sort=True):
        g = g.sort_values("seed")
        acc = g.dark_accuracy_pct
        row = {"param": g.param.iloc[0], "value": value, "arch": arch, "train_type": train_type,
               "n_seeds": len(g), "dark_accuracy_pct_mean": round(acc.mean(), 4),
               "dark_accuracy_pct_std": round(acc.std(ddof=1), 4) if len(g) > 1 else float("nan"),
               "dark_accuracy_pct_by_seed": "; ".join(f"{s}: {a:.2f}" for s, a in zip(g.seed, acc)),
               "tone_shift_deg": round(g.tone_shift_deg.iloc[0], 4),
               "syn_in_band_pct": round(g.syn_in_band_pct.iloc[0], 4),
               "experiments": ", ".join(sorted(set(g.experiment)))}
        if g[QUALITY_KEY].notna().any():
            row[QUALITY_KEY] = round(g[QUALITY_KEY].iloc[0], 4)
        out.append(row)
    return pd.DataFrame(out)


# --- outputs ----------------------------------------------------------------------------------

def markdown(table: pd.DataFrame) -> str:
    param = table.param.iloc[0]
    show = pd.DataFrame({
        param: table.value,
        "classifier": [f"{ARCH_NAMES.get(a, a)} {TRAIN_NAMES.get(t, t)}" for a, t in zip(table.arch, table.train_type)],
        "dark-skin accuracy % (mean ± std)": [
            f"{m:.2f} ± {s:.2f}" if pd.notna(s) else f"{m:.2f}"
            for m, s in zip(table.dark_accuracy_pct_mean, table.dark_accuracy_pct_std)],
        "per seed": table.dark_accuracy_pct_by_seed, "seeds": table.n_seeds,
        "tone shift (ITA °)": table.tone_shift_deg.map("{:.1f}".format),
        "synthetic in target band %": table.syn_in_band_pct.map("{:.1f}".format),
    })
    if QUALITY_KEY in table:
        show["lesion kept %"] = table[QUALITY_KEY].map("{:.1f}".format)
    show["experiments"] = table.experiments
    head = "| " + " | ".join(show.columns) + " |\n|" + "---|" * len(show.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in show.itertuples(index=False))
    return (f"# Sweep over {param}\n\nAccuracy on the dark-skin test images (splits.dark), mean ± sample std over "
            f"seeds. Tone shift: median ITA of the synthetic images made from light sources minus that of the "
            f"real light images (negative: darker), one seed's images (report.seed).\n\n{head}{body}")


def figure(table: pd.DataFrame, runs_df: pd.DataFrame, path: Path) -> None:
    """Dark-skin accuracy (mean ± std, each seed a dot) and tone shift against the swept value."""
    param = table.param.iloc[0]
    panels = [("dark_accuracy_pct", "dark-skin test accuracy (%)"),
              ("tone_shift_deg", "tone shift (ITA °, light → syn)")]
    if QUALITY_KEY in table:
        panels.append((QUALITY_KEY, "lesion kept (%)"))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    numeric = pd.api.types.is_numeric_dtype(table.value)
    x_of = (lambda v: v) if numeric else {v: i for i, v in enumerate(sorted(table.value.unique(), key=str))}.get
    for (arch, train_type), g in table.groupby(["arch", "train_type"], sort=True):
        label = f"{ARCH_NAMES.get(arch, arch)} {TRAIN_NAMES.get(train_type, train_type)}"
        colour = COLOURS.get(train_type)
        xs = [x_of(v) for v in g.value]
        axes[0].errorbar(xs, g.dark_accuracy_pct_mean, yerr=g.dark_accuracy_pct_std.fillna(0), marker="o",
                         capsize=3, color=colour, label=label)
        r = runs_df[(runs_df.arch == arch) & (runs_df.train_type == train_type)]
        axes[0].scatter([x_of(v) for v in r.value], r.dark_accuracy_pct, s=10, color=colour, alpha=0.5)
    one = table.drop_duplicates("value").sort_values("value", key=lambda s: s.map(x_of))
    for ax, (column, title) in zip(axes[1:], panels[1:]):
        ax.plot([x_of(v) for v in one.value], one[column], marker="o", color="#555555")
    for ax, (_, title) in zip(axes, panels):
        ax.set(xlabel=param, ylabel=title)
        ax.set_xticks([x_of(v) for v in one.value], [str(v) for v in one.value])  # the swept values only
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sweep over {param}: {len(one)} values, {table.n_seeds.max()} seed(s) each", fontsize=10)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_report(exps: list[dict], out_dir: Path, read: Reader, listdir: Lister,
                 param: str | None = None) -> pd.DataFrame:
    """out_dir/sweep.md, sweep.csv (one row per value and classifier), sweep.png; returns the table."""
    if len(exps) < 2:
        raise SkinaugError(f"{len(exps)} finished experiment(s) found; a sweep needs two or more "
                           "(`dvc exp run --queue -S 'generate.strength=0.3,0.5,0.7'`, then `dvc exp run --run-all`)")
    param = swept_param(exps, param)
    per_run = runs(exps, param, read, listdir)
    table = summarise(per_run)
    out_dir = Path(out_dir)
    atomic.write_csv(out_dir / "sweep.csv", table)
    atomic.write_text(out_dir / "sweep.md", markdown(table) + "\n![sweep](sweep.png)\n")
    figure(table, per_run, out_dir / "sweep.png")
    return table


# --- the repository ---------------------------------------------------------------------------

def git_reader(repo_dir: Path) -> tuple[Reader, Lister]:
    """Read files as committed in an experiment: `git show REV:PATH`, `git ls-tree -r REV PATH`."""
    def read(rev: str, path: str) -> bytes | None:
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo_dir, capture_output=True)
        return done.stdout if done.returncode == 0 else None

    def listdir(rev: str, folder: str) -> list[str]:
        done = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "--", folder], cwd=repo_dir,
                              capture_output=True, text=True)
        return done.stdout.splitlines() if done.returncode == 0 else []

    return read, listdir


def exp_show(repo_dir: Path) -> list | dict:
    """`dvc exp show --json` of the repository: the experiments of its HEAD commit."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo_dir, capture_output=True,
                          text=True)  # this environment's dvc, a dependency of skinaug
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SkinaugError(f"`dvc exp show --json` failed in {repo_dir} ({last}); run sweep-report in the "
                           "project's repository or name it with --repo")
    return json.loads(done.stdout or "[]")


def select(exps: list[dict], names: tuple[str, ...]) -> list[dict]:
    """The experiments named (all when none is), each name checked."""
    if not names:
        return exps
    known = {e["name"] for e in exps}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SkinaugError(f"no finished experiment named {', '.join(unknown)}; finished: {', '.join(sorted(known))}")
    return [e for e in exps if e["name"] in names]
