"""The select stage keeps exactly what its rules say, reads nothing of a split, and with no rules
leaves the classifiers' metrics byte for byte as they were. CPU, seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
from test_quality import RightByConstruction, uniform_study

from skinaug import SkinaugError, config, tone
from skinaug.classify import classifiers, select
from skinaug.data import fitzpatrick

from test_classifiers import LABELS, small_cfg, write_study


def with_rules(cfg: config.Config, rules: list[str], best_n: int = 1) -> config.Config:
    return config.replace(cfg, select=config.replace(cfg.select, rules=rules, best_n=best_n))


def table() -> pd.DataFrame:
    """Six images of two sources: in band or not, recognised or not, with beliefs."""
    return pd.DataFrame({
        "file": [f"images/{i}.png" for i in range(6)],
        "source_md5hash": ["a", "a", "a", "b", "b", "b"],
        "label": ["x"] * 6,
        "fitzpatrick_scale": [5] * 6,
        "in_band": [True, True, False, True, False, True],
        "predicted": ["x", "y", "x", "x", "x", "x"],
        "p_label": [0.6, 0.2, 0.9, 0.5, 0.8, 0.7],
    })


@pytest.mark.parametrize(("rules", "best_n", "kept"), [
    ([], 1, [0, 1, 2, 3, 4, 5]),
    (["tone"], 1, [0, 1, 3, 5]),
    (["lesion"], 1, [0, 2, 3, 4, 5]),
    (["best_n"], 1, [2, 4]),  # the surest per source
    (["best_n"], 2, [0, 2, 4, 5]),
    (["tone", "lesion"], 1, [0, 3, 5]),
    (["tone", "lesion", "best_n"], 1, [0, 5]),  # best_n among what tone and lesion left
    (["best_n", "tone"], 1, [0, 5]),  # rules apply in select.RULES order, whatever the list's
])
def test_select_keeps_exactly_what_its_rules_say(rules, best_n, kept):
    dropped = select.decide(table(), [r for r in select.RULES if r in rules], best_n)
    assert list(dropped.index[dropped == ""]) == kept
    if "tone" in rules:
        assert (dropped[~table().in_band] == "tone").all()


def coloured_syn(root: Path) -> Path:
    """Synthetic images requested at FST 5: even ones brown skin (in band), odd ones pale (not)."""
    syn = root / "syn"
    (syn / "images").mkdir(parents=True)
    rows = []
    for i in range(6):
        colour = (120, 80, 50) if i % 2 == 0 else (250, 225, 215)
        PIL.Image.new("RGB", (32, 32), colour).save(syn / f"images/{i}.png")
        rows.append({"file": f"images/{i}.png", "source_md5hash": f"s{i // 2}".ljust(32, "0"), "label": LABELS[i % 2],
                     "fitzpatrick_scale": 5, "source_fitzpatrick_scale": 1, "prompt": "p"})
    pd.DataFrame(rows).to_csv(syn / "manifest.csv", index=False)
    return syn


def test_no_rules_keep_the_manifest_as_it_is(tmp_path):
    syn = coloured_syn(tmp_path)
    summary = select.run(syn, tmp_path / "absent.pt", tmp_path / "out", with_rules(small_cfg(), []))
    kept = pd.read_csv(tmp_path / "out" / "kept.csv")
    assert kept.equals(pd.read_csv(syn / "manifest.csv"))
    assert summary.generated.sum() == summary.kept.sum() == 6
    assert classifiers.read_manifest(syn, "syn", tmp_path / "out" / "kept.csv").equals(classifiers.read_manifest(syn, "syn"))


def test_tone_rule_drops_the_images_outside_the_requested_band(tmp_path):
    syn = coloured_syn(tmp_path)
    select.run(syn, tmp_path / "absent.pt", tmp_path / "out", with_rules(small_cfg(), ["tone"]))
    decisions = pd.read_csv(tmp_path / "out" / "decisions.csv")
    assert list(decisions.in_band) == [tone.in_expected_band(v, 5) for v in decisions.ita]
    assert list(decisions.in_band) == [True, False] * 3  # the colours were chosen so
    kept = pd.read_csv(tmp_path / "out" / "kept.csv")
    assert list(kept.file) == [f"images/{i}.png" for i in (0, 2, 4)]
    counts = pd.read_csv(tmp_path / "out" / "counts.csv")
    assert list(counts.generated) == [3, 3] and list(counts.kept) == [3, 0]
    assert "tone" in (tmp_path / "out" / "counts.md").read_text()


def test_rules_that_keep_nothing_stop_with_one_line(tmp_path):
    syn = coloured_syn(tmp_path)
    manifest = pd.read_csv(syn / "manifest.csv")
    manifest.iloc[1::2].to_csv(syn / "manifest.csv", index=False)  # only the pale images
    with pytest.raises(SkinaugError, match="keep none of the 3 synthetic images") as err:
        select.run(syn, tmp_path / "absent.pt", tmp_path / "out", with_rules(small_cfg(), ["tone"]))
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "kept.csv").exists()


def test_lesion_rule_uses_the_reference_classifier_and_reads_no_split(tmp_path, monkeypatch):
    """With a classifier right by construction, only the repainted image goes; every file select
    opens is a synthetic image or its manifest (no split CSV, no real image)."""
    paths = uniform_study(tmp_path)
    cfg = with_rules(small_cfg(), ["lesion"])
    monkeypatch.setattr(classifiers, "load_reference",
                        lambda path, cfg, device, weights=None: (RightByConstruction(cfg).eval(), LABELS))
    opened = []
    real_open, real_read = PIL.Image.open, fitzpatrick.read_table
    monkeypatch.setattr(PIL.Image, "open", lambda p, *a, **k: opened.append(Path(p)) or real_open(p, *a, **k))
    monkeypatch.setattr(fitzpatrick, "read_table", lambda p: opened.append(Path(p)) or real_read(p))
    select.run(paths["syn_dir"], tmp_path / "reference.pt", tmp_path / "out", cfg)
    manifest = pd.read_csv(paths["syn_dir"] / "manifest.csv")
    kept = pd.read_csv(tmp_path / "out" / "kept.csv")
    assert list(kept.file) == list(manifest.file[:-1])  # write_study's last image is painted another label
    assert opened and all(p.is_relative_to(paths["syn_dir"]) for p in opened), opened
    assert len({p for p in opened if p.suffix == ".png"}) == len(manifest)


def test_classify_trains_on_the_kept_images_only(tmp_path):
    paths = write_study(tmp_path)
    manifest = pd.read_csv(paths["syn_dir"] / "manifest.csv")
    manifest.iloc[::2].to_csv(tmp_path / "kept.csv", index=False)
    got = classifiers.read_manifest(paths["syn_dir"], "real_syn", tmp_path / "kept.csv")
    assert list(got.file) == list(manifest.file.iloc[::2])
    manifest.assign(file="images/elsewhere.png").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SkinaugError, match="select stage"):
        classifiers.read_manifest(paths["syn_dir"], "syn", tmp_path / "bad.csv")


@pytest.mark.slow  # two classifiers: ~15 s on 2 busy cores
def test_with_no_rules_classify_writes_the_same_bytes(tmp_path):
    """The paper's protocol stays faithful: a kept list of every image changes no metric byte."""
    paths = write_study(tmp_path)
    cfg = with_rules(small_cfg(epochs=1), [])
    select.run(paths["syn_dir"], tmp_path / "absent.pt", tmp_path / "sel", cfg)
    plain, kept = tmp_path / "plain.json", tmp_path / "kept.json"
    classifiers.run(paths["split_dir"], paths["images_dir"], paths["syn_dir"], {"test": plain}, "resnet18", "real_syn",
                 cfg, 0)
    classifiers.run(paths["split_dir"], paths["images_dir"], paths["syn_dir"], {"test": kept}, "resnet18", "real_syn",
                 cfg, 0, keep=tmp_path / "sel" / "kept.csv")
    assert plain.read_bytes() == kept.read_bytes()
    assert np.isfinite(pd.read_json(plain, typ="series")["accuracy_pct"])
