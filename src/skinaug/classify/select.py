"""Which synthetic images the classifiers train on (issue 17): all of them, or the good ones.

    skinaug select data/synthetic/scenario1/seed0 data/selected/scenario1/seed0 \
        --reference models/scenario1/seed0/reference.pt

select.rules (applied in the order of RULES, each to what the one before kept):
    []      the paper's protocol: every synthetic image is kept (the classifiers' metrics are
            byte for byte those of a run without this stage);
    tone    drop images whose skin ITA misses the requested type's band (tone.EXPECTED_ITA);
    lesion  drop images the reference classifier (real training images only) does not give the
            source's label;
    best_n  keep at most select.best_n images per source, those the reference classifier is
            surest show the source's label (ties: manifest order).
Writes OUT_DIR/kept.csv (the kept manifest rows, in manifest order; `skinaug classify --keep`
reads it), decisions.csv (each image's measures and the rule that dropped it) and counts.csv /
counts.md (generated and kept per label x requested skin type). It reads the synthetic images,
their manifest and the reference classifier: no split, so never a test image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from skinaug import SkinaugError, atomic, tone
from skinaug.classify import classifiers, quality
from skinaug.config import SELECT_RULES, Config
from skinaug.data import fitzpatrick
from skinaug.diffusion import sd21

RULES = SELECT_RULES  # config.py lists them in the order they apply


def measures(manifest: pd.DataFrame, syn_dir: Path, reference: Path, rules: list[str], cfg: Config,
             weights: Path | None = None) -> pd.DataFrame:
    """What the rules look at, computed only when a rule needs it: ita and in_band (tone),
    predicted and p_label (lesion, best_n). weights: the reference's backbone file (load_reference)."""
    table = manifest.copy()
    paths = [str(Path(syn_dir) / f) for f in manifest.file]
    if "tone" in rules:
        table["ita"] = tone.measure([Path(p) for p in paths])
        table["in_band"] = [tone.in_expected_band(v, s) for v, s in zip(table.ita, table.fitzpatrick_scale)]
    if {"lesion", "best_n"} & set(rules):
        device = sd21.pick_device(cfg.model.device)
        model, labels = classifiers.load_reference(reference, cfg, device, weights)
        _, logp = quality.classifier_pass(model, paths, cfg, device)
        target = np.array([labels.index(x) for x in manifest.label])
        table["predicted"] = [labels[i] for i in logp.argmax(1)]
        table["p_label"] = np.exp(logp[np.arange(len(table)), target])
    return table


def decide(table: pd.DataFrame, rules: list[str], best_n: int) -> pd.Series:
    """The rule that drops each image ("" = kept), rules applied in RULES order."""
    dropped = pd.Series("", index=table.index)
    if "tone" in rules:
        dropped[(dropped == "") & ~table.in_band.astype(bool)] = "tone"
    if "lesion" in rules:
        dropped[(dropped == "") & (table.predicted != table.label)] = "lesion"
    if "best_n" in rules:
        alive = table[dropped == ""]
        order = alive.sort_values("p_label", ascending=False, kind="stable")
        rank = order.groupby("source_md5hash", sort=False).cumcount()
        dropped[rank.index[rank.to_numpy() >= best_n]] = "best_n"
    return dropped


def counts(table: pd.DataFrame, dropped: pd.Series) -> pd.DataFrame:
    """Generated and kept images per label and requested skin type."""
    frame = table.assign(kept=dropped == "")
    out = frame.groupby(["label", "fitzpatrick_scale"]).kept.agg(generated="size", kept="sum").reset_index()
    out["kept_pct"] = (100 * out.kept / out.generated).round(1)
    return out


def run(syn_dir: Path, reference: Path, out_dir: Path, cfg: Config, weights: Path | None = None) -> pd.DataFrame:
    """Apply select.rules to one generate output; write kept.csv, decisions.csv, counts.csv/.md.
    weights: the reference's backbone file (load_reference)."""
    rules = [r for r in RULES if r in cfg.select.rules]
    manifest = fitzpatrick.read_table(Path(syn_dir) / "manifest.csv")
    table = measures(manifest, syn_dir, reference, rules, cfg, weights)
    dropped = decide(table, rules, cfg.select.best_n)
    if len(table) and (dropped != "").all():
        raise SkinaugError(f"select.rules {rules} keep none of the {len(table)} synthetic images in {syn_dir} "
                           f"(dropped by {', '.join(sorted(set(dropped)))}); loosen select.rules")
    out_dir = Path(out_dir)
    atomic.write_csv(out_dir / "kept.csv", manifest[(dropped == "").to_numpy()])
    atomic.write_csv(out_dir / "decisions.csv", table.assign(dropped_by=dropped))
    summary = counts(table, dropped)
    atomic.write_csv(out_dir / "counts.csv", summary)
    described = ", ".join(rules) + (f" (best_n {cfg.select.best_n})" if "best_n" in rules else "")
    atomic.write_text(out_dir / "counts.md", f"# Synthetic images kept by select.rules [{described}]\n\n"
                      + summary.rename(columns={"fitzpatrick_scale": "FST"}).to_markdown(index=False) + "\n")
    return summary
