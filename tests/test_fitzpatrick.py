"""Metadata, study subset and Table 1 (skinaug.data.fitzpatrick), through the functions and the CLI.

Real-data checks run when SKINAUG_FITZ_CSV names fitzpatrick17k.csv, and skip otherwise.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError, cli, config, hashing, paper
from skinaug.data import fitzpatrick

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
