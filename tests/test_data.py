"""Metadata, study subset, Table 1 and the demo world (skinaug.data).

Real-data checks run when SKINAUG_FITZ_CSV names fitzpatrick17k.csv, and skip otherwise.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError, cli, config, hashing, paper
from skinaug.data import fitzpatrick
from skinaug.demo import world

PINNED_MD5 = "75556ecbd0bd6227050112565c24b991"  # SPEC §1, data.dvc
FST_TOTALS = {1: 420, 2: 864, 5: 251, 6: 96}
LABEL_TOTALS = {"basal cell carcinoma": 272, "folliculitis": 167, "nematode infection": 115,
                "neutrophilic dermatoses": 231, "prurigo nodularis": 73, "psoriasis": 430,
                "squamous cell carcinoma": 343}


def _check_table1_counts(df: pd.DataFrame) -> None:
    assert len(df) == 1631
    assert df["fitzpatrick_scale"].value_counts().to_dict() == FST_TOTALS
    assert df["label"].value_counts().to_dict() == LABEL_TOTALS
    cross = pd.crosstab(df["label"], df["fitzpatrick_scale"])
    assert {label: {int(k): int(v) for k, v in row.items()} for label, row in cross.iterrows()} == paper.TABLE1_COUNTS


# --- the real metadata ---------------------------------------------------------------

def test_real_subset_is_table1(fitz_csv, repo_cfg):
    meta = fitzpatrick.load_metadata(fitz_csv, PINNED_MD5)
    assert len(meta) == 16577
    subset = fitzpatrick.study_subset(meta, repo_cfg.subset)
    _check_table1_counts(subset)
    assert list(subset.columns) == list(meta.columns) == fitzpatrick.COLUMNS
    kept = meta[meta["md5hash"].isin(subset["md5hash"])]
    assert subset["md5hash"].tolist() == kept["md5hash"].tolist()  # CSV order kept
    table = fitzpatrick.table1(subset)
    assert "| total | 420 | 864 | 251 | 96 | 1631 |" in table
    assert "| basal cell carcinoma | 85 | 156 | 24 | 7 | 272 |" in table


def test_tampered_metadata_is_refused(fitz_csv, tmp_path):
    copy = tmp_path / "fitzpatrick17k.csv"
    shutil.copy(fitz_csv, copy)
    with copy.open("a") as f:
        f.write("\n")
    with pytest.raises(SkinaugError) as err:
        fitzpatrick.load_metadata(copy, PINNED_MD5)
    message = str(err.value)
    assert PINNED_MD5 in message and hashing.file_digest(copy, "md5") in message and "dvc update data.dvc" in message


def test_real_subset_command_drops_unknown_skin_type(fitz_csv, params_file, tmp_path):
    out = CliRunner().invoke(cli.main, ["--params", str(params_file()), "subset", str(fitz_csv),
                                        str(tmp_path / "subset.csv")])
    assert out.exit_code == 0, out.output
    assert "subset: 1631 of 16577 rows" in out.output
    assert "(565 of unknown skin type, fitzpatrick_scale -1, dropped)" in out.output


# --- metadata checks without the real file ------------------------------------------

def test_load_metadata_checks_md5_and_columns(world_dir, tmp_path):
    path = world_dir / "metadata.csv"
    good = hashing.file_digest(path, "md5")
    assert len(fitzpatrick.load_metadata(path, good)) == 1631
    with pytest.raises(SkinaugError, match="expected 0{32}"):
        fitzpatrick.load_metadata(path, "0" * 32)
    broken = tmp_path / "broken.csv"
    pd.read_csv(path).drop(columns=["url"]).to_csv(broken, index=False)
    with pytest.raises(SkinaugError, match="lacks column.*url"):
        fitzpatrick.load_metadata(broken, None)
    with pytest.raises(SkinaugError, match="dvc update data.dvc"):
        fitzpatrick.load_metadata(tmp_path / "absent.csv", None)


def test_all_digit_md5hash_stays_text(world_dir, tmp_path):
    meta = pd.read_csv(world_dir / "metadata.csv", dtype=str)
    meta.loc[0, "md5hash"] = "0" + "1" * 31
    path = tmp_path / "m.csv"
    meta.to_csv(path, index=False)
    assert fitzpatrick.load_metadata(path, None).loc[0, "md5hash"] == "0" + "1" * 31


def test_study_subset_filters_and_names_unknown_labels(world_dir, repo_cfg):
    meta = fitzpatrick.load_metadata(world_dir / "metadata.csv", None)
    only_light = config.replace(repo_cfg.subset, fitzpatrick_scales=[1, 2])
    assert len(fitzpatrick.study_subset(meta, only_light)) == 1284
    typo = config.replace(repo_cfg.subset, labels=["psoriasis", "psoriasiss"])
    with pytest.raises(SkinaugError, match="psoriasiss"):
        fitzpatrick.study_subset(meta, typo)


def _edited(edit):
    """Bad metadata made by editing the world's rows, read as text so that any value can be written."""
    def make(world_csv: Path) -> bytes:
        meta = pd.read_csv(world_csv, dtype=str, keep_default_na=False)
        edit(meta)
        return meta.to_csv(index=False).encode()
    return make


def _set(column: str, value: str, rows=(3,)):
    def edit(meta):
        meta.loc[list(rows) if rows else meta.index, column] = value
    return _edited(edit)


def _duplicate(meta):
    meta.loc[[4, 9], "md5hash"] = meta.loc[3, "md5hash"]


def _png(_) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


def _longer_rows(p: Path) -> bytes:
    header, *rows = p.read_bytes().splitlines()
    return b"\n".join([header, *(row + b",extra" for row in rows)]) + b"\n"


def _json(indent):
    return lambda p: json.dumps(pd.read_csv(p, dtype=str).head(3).to_dict("records"), indent=indent).encode()


# Each: what the metadata file holds (None: a folder, not a file) -> what the one error line says.
BAD_METADATA = {
    "a binary file": (_png, "is not text"),
    "text with NUL bytes": (lambda p: p.read_bytes()[:300] + b"\0\0\0", "is not text .*NUL"),
    "latin-1 text": (lambda p: p.read_text().replace("psoriasis", "psoriasis \xe9").encode("latin-1"),
                     "is not UTF-8 text.*CSV UTF-8"),
    "an empty file": (lambda p: b"", "is empty"),
    "blank lines": (lambda p: b"\n\n  \n", "is empty"),
    "JSON, indented": (_json(1), "is not a CSV"),
    "JSON on one line": (_json(None), "is not a Fitzpatrick17k metadata CSV"),
    "one column (semicolons)": (lambda p: p.read_bytes().replace(b",", b";"), "save it with commas, not ';'"),
    "a header only": (lambda p: p.read_bytes().split(b"\n")[0] + b"\n", "has a header but no rows"),
    "rows longer than the header": (_longer_rows, "more fields than its header"),
    "a missing column": (lambda p: pd.read_csv(p, dtype=str).drop(columns="url").to_csv(index=False).encode(),
                         "lacks column.*url"),
    "fitzpatrick_scale 'V'": (_set("fitzpatrick_scale", "V"), r"fitzpatrick_scale must be 1 to 6.*line 5 \('V'\)"),
    "fitzpatrick_scale 7": (_set("fitzpatrick_scale", "7", rows=(3, 4, 5, 6, 7)),
                            r"fitzpatrick_scale must be 1 to 6.*line 5 \('7'\).*line 7 \('7'\) and 2 more"),
    "fitzpatrick_scale 0": (_set("fitzpatrick_scale", "0"), "fitzpatrick_scale must be 1 to 6, or -1"),
    "fitzpatrick_scale 2.5": (_set("fitzpatrick_scale", "2.5"), "fitzpatrick_scale must be 1 to 6, or -1"),
    "fitzpatrick_scale empty": (_set("fitzpatrick_scale", ""), r"fitzpatrick_scale must be .*line 5 \(empty\)"),
    "label empty": (_set("label", ""), r"label is empty: line 5 \(empty\)"),
    "label blank": (_set("label", "  "), "label is empty"),
    "md5hash empty": (_set("md5hash", ""), r"md5hash must name an image file.*line 5 \(empty\)"),
    "md5hash a path": (_set("md5hash", "../outside"), "md5hash must name an image file.*'../outside'"),
    "md5hash twice": (_edited(_duplicate), r"1 md5hash value\(s\) on more than one row \([0-9a-f]{32} on lines 5, 6, 11\)"),
    "no study rows": (_set("fitzpatrick_scale", "3", rows=None), "no metadata row has one of subset.labels"),
    "a folder": (None, "is a folder; give the metadata CSV file itself"),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_bad_metadata_is_refused_in_one_line(case, world_dir, params_file, tmp_path):
    make, expected = BAD_METADATA[case]
    bad = tmp_path / "metadata.csv"
    if make is None:
        bad.mkdir()
    else:
        bad.write_bytes(make(world_dir / "metadata.csv"))
    out_csv, table = tmp_path / "subset.csv", tmp_path / "table1.md"
    out = CliRunner().invoke(cli.main, ["--params", str(params_file()), "subset", str(bad), str(out_csv),
                                        "--table", str(table)])
    assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output  # refused, not crashed
    lines = out.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.output
    assert re.search(expected, lines[0]), lines[0]
    assert not out_csv.exists() and not table.exists()


def test_unknown_skin_type_rows_are_dropped_and_counted(world_dir, params_file, tmp_path):
    meta = pd.read_csv(world_dir / "metadata.csv", dtype=str, keep_default_na=False)
    unknown = meta.head(5).assign(md5hash=[f"{i:032x}" for i in range(5)], fitzpatrick_scale="-1")
    path = tmp_path / "metadata.csv"
    pd.concat([meta, unknown]).to_csv(path, index=False)
    out = CliRunner().invoke(cli.main, ["--params", str(params_file()), "subset", str(path),
                                        str(tmp_path / "subset.csv")])
    assert out.exit_code == 0, out.output
    assert "subset: 1631 of 1636 rows" in out.output, out.output
    assert "(5 of unknown skin type, fitzpatrick_scale -1, dropped)" in out.output, out.output
    kept = pd.read_csv(tmp_path / "subset.csv")
    assert len(kept) == 1631 and -1 not in set(kept["fitzpatrick_scale"])
    # subset.fitzpatrick_scales cannot ask for them: settings allow only 1 to 6
    out = CliRunner().invoke(cli.main, ["--params", str(params_file(subset={"fitzpatrick_scales": [-1, 1, 2, 5, 6]})),
                                        "subset", str(path), str(tmp_path / "again.csv")])
    assert out.exit_code == 1 and "subset.fitzpatrick_scales is [-1, 1, 2, 5, 6]" in out.output
    assert not (tmp_path / "again.csv").exists()


# --- the demo world --------------------------------------------------------------------

def test_world_has_table1_counts_and_images(world_dir, repo_cfg):
    meta = pd.read_csv(world_dir / "metadata.csv", dtype={"md5hash": str})
    assert list(meta.columns) == fitzpatrick.COLUMNS
    _check_table1_counts(meta)
    assert meta["md5hash"].is_unique
    assert set(meta["fitzpatrick_centaur"]) <= {-1, 1, 2, 3, 4, 5, 6}
    assert meta["url"].str.startswith("https://example.invalid/world/").all()
    files = sorted(p.stem for p in (world_dir / "images").glob("*.jpg"))
    assert files == sorted(meta["md5hash"])
    with Image.open(world_dir / "images" / f"{meta.md5hash[0]}.jpg") as img:
        assert img.format == "JPEG" and img.size == (repo_cfg.world.image_size,) * 2
    # The subset stage keeps every world row.
    assert len(fitzpatrick.study_subset(fitzpatrick.load_metadata(world_dir / "metadata.csv", None), repo_cfg.subset)) == 1631


def test_world_is_deterministic(tmp_path, repo_cfg):
    small = config.replace(repo_cfg.subset, labels=["nematode infection", "prurigo nodularis"])
    a = world.make_world(repo_cfg.world, small, tmp_path / "a")
    b = world.make_world(repo_cfg.world, small, tmp_path / "b")
    c = world.make_world(config.replace(repo_cfg.world, seed=1), small, tmp_path / "c")
    assert len(a) == 115 + 73
    pd.testing.assert_frame_equal(a, b)
    for md5 in a["md5hash"]:
        assert (tmp_path / "a/images" / f"{md5}.jpg").read_bytes() == (tmp_path / "b/images" / f"{md5}.jpg").read_bytes()
    assert not set(a["md5hash"]) & set(c["md5hash"])
    assert a["md5hash"][0] == hashlib.md5(b"world-0-0").hexdigest()


def test_world_refuses_unknown_label(tmp_path, repo_cfg):
    with pytest.raises(SkinaugError, match="no pattern for acne"):
        world.make_world(repo_cfg.world, config.replace(repo_cfg.subset, labels=["acne"]), tmp_path)


def test_skin_darkens_with_type_and_every_lesion_shows_on_every_tone():
    rng = np.random.default_rng(0)
    fst = np.repeat(np.arange(1, 7), 20)
    skin = world.draw_skin(fst, rng, 64)
    brightness = [skin[fst == f].mean() for f in range(1, 7)]
    assert all(a > b for a, b in zip(brightness, brightness[1:])), brightness
    for label in world.LESIONS:
        painted, height = world.draw_lesion(label, skin, fst, rng)
        # Visible: the lesion's most changed pixels (99th percentile) differ from the skin by > 8 %.
        change = np.abs(painted - skin).sum(-1) / skin.sum(-1)
        strongest = np.percentile(change.reshape(len(fst), -1), 99, axis=1)
        for f in range(1, 7):
            assert np.median(strongest[fst == f]) > 0.08, (label, f, np.median(strongest[fst == f]))
        assert height.shape == skin.shape[:3]
    photos = world.render("psoriasis", [1, 6], rng, 32)
    assert photos.shape == (2, 32, 32, 3) and photos.dtype == np.uint8


def test_classifier_trained_on_light_skin_loses_accuracy_on_dark(world_dir):
    """The point of the world: light-only training transfers badly to dark skin (~0.75 vs ~0.2 accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    meta = pd.read_csv(world_dir / "metadata.csv", dtype={"md5hash": str})
    x = np.stack([np.asarray(Image.open(world_dir / "images" / f"{m}.jpg").resize((16, 16), Image.BILINEAR),
                             np.float32).ravel() / 255 for m in meta["md5hash"]])
    y = meta["label"].to_numpy()
    light = meta["fitzpatrick_scale"].isin([1, 2]).to_numpy()
    held = np.random.default_rng(0).random(len(meta)) < 0.5

    def accuracy(train, test):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs may stop before full convergence; irrelevant here
            model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=200)).fit(x[train], y[train])
        return (model.predict(x[test]) == y[test]).mean()

    on_light = accuracy(light & ~held, light & held)
    on_dark = accuracy(light & ~held, ~light & held)
    with_dark = accuracy(~held, ~light & held)
    assert on_light > 0.6, on_light
    assert on_dark < on_light - 0.3, (on_light, on_dark)
    assert with_dark > on_dark + 0.1, (on_dark, with_dark)  # dark skin is learnable, just not from light skin


# --- the stages through the CLI, as dvc.yaml runs them ---------------------------------

def test_world_subset_images_splits_commands(world_dir, params_file, tmp_path):
    params = params_file(data={"images_dir": str(world_dir / "images")})
    run = CliRunner().invoke
    base = ["--params", str(params)]

    out = run(cli.main, base + ["subset", str(world_dir / "metadata.csv"), str(tmp_path / "subset.csv"),
                                "--table", str(tmp_path / "table1.md")])
    assert out.exit_code == 0, out.output
    assert "1631 of 1631 rows" in out.output and "(0 of unknown skin type" in out.output
    assert "| total | 420 | 864 | 251 | 96 | 1631 |" in (tmp_path / "table1.md").read_text()
    out = run(cli.main, base + ["images", str(tmp_path / "subset.csv"), str(tmp_path / "images"),
                                "--available", str(tmp_path / "available.csv"), "--failures", str(tmp_path / "f.csv")])
    assert out.exit_code == 0, out.output
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 1631
    sizes = {1: "train 1519, test 56", 2: "train 1284, test 291", 3: "train 1228, test 291"}
    for scenario, expected in sizes.items():
        out = run(cli.main, base + ["splits", str(tmp_path / "available.csv"), str(tmp_path / f"s{scenario}"),
                                    "--scenario", str(scenario), "--seed", "42"])
        assert out.exit_code == 0 and f"splits: {expected}, flex_light 56, flex_dark 56" in out.output, out.output
    out = run(cli.main, base + ["splits", str(tmp_path / "available.csv"), str(tmp_path / "s4"),
                                "--scenario", "4", "--seed", "0"])
    assert out.exit_code == 1 and "scenario 4 does not exist" in out.output
