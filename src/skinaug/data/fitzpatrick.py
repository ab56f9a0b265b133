"""Metadata, study subset and images (SPEC §1); the demo world is in demo/world.py.

Stages (dvc.yaml runs them; by hand, from the repository root):

    skinaug subset data/world/metadata.csv data/subset.csv --table reports/table1.md
    skinaug images data/subset.csv data/images \
        --available data/available.csv --failures reports/image_failures.csv

`subset` keeps exactly 1,631 rows of the real fitzpatrick17k.csv (paper Table 1);
the demo world (world.py) is drawn with exactly those counts per label and skin
type, so every later stage sees the study's sizes either way. `images` copies from a local folder
(data.images_dir) or downloads the `url` column, resuming where it stopped.

One module, over 300 lines, for one idea: the dataset's own file and images, read, checked and
collected with one set of column names and one refusal style (train.csv readers: data/trainset.py).
"""
from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd
import requests
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from skinaug import SkinaugError, atomic, hashing
from skinaug.config import DataConfig, DownloadConfig, SubsetConfig

COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
           "three_partition_label", "qc", "url", "url_alphanum"]
# Hex hashes that happen to be all digits must not become numbers.
_DTYPES = {"md5hash": str, "source_md5hash": str, "label": str, "url": str, "url_alphanum": str, "qc": str,
           "file": str}

_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI"}


# --- metadata and the study subset -------------------------------------------------

def load_metadata(path: str | Path, md5: str | None) -> pd.DataFrame:
    """Read a Fitzpatrick17k-style CSV; verify its md5 first when one is pinned, then every row.

    Anything a researcher's own metadata can get wrong (not a CSV, missing columns, a skin type
    outside 1-6 and -1, an empty label or md5hash, one md5hash on two rows) is a SkinaugError.
    """
    path = Path(path)
    if path.is_dir():
        raise SkinaugError(f"{path} is a folder; give the metadata CSV file itself")
    if not path.exists():
        raise SkinaugError(f"{path} not found; fetch the pinned metadata with `dvc update data.dvc`")
    if md5 is not None:
        actual = hashing.file_digest(path, "md5")
        if actual != md5:
            raise SkinaugError(
                f"{path} has md5 {actual}, expected {md5} (data.metadata_md5): not the pinned file. "
                "Fetch it again with `dvc update data.dvc` (or download fitzpatrick17k.csv from "
                "github.com/mattgroh/fitzpatrick17k at the commit data.dvc names)")
    meta = _parse_csv(path)
    _check_columns(meta, path)
    return _check_rows(meta, path)


def read_table(path: str | Path) -> pd.DataFrame:
    """Any of the pipeline's CSVs (splits, manifests), with hashes and names kept as text."""
    return pd.read_csv(path, dtype=_DTYPES)


_EXPECTED = "expected the Fitzpatrick17k metadata: a comma-separated UTF-8 text file with a header row"


def _parse_csv(path: Path) -> pd.DataFrame:
    """read_table, with what makes a file unreadable as a CSV said in one line instead of a traceback."""
    with path.open("rb") as f:
        if b"\0" in f.read(1 << 16):
            raise SkinaugError(f"{path} is not text (it holds NUL bytes, as binary files do); {_EXPECTED}")
    try:
        meta = read_table(path)
    except UnicodeDecodeError:
        raise SkinaugError(f"{path} is not UTF-8 text; {_EXPECTED} (re-save a spreadsheet as CSV UTF-8)") from None
    except pd.errors.EmptyDataError:
        raise SkinaugError(f"{path} is empty; {_EXPECTED}") from None
    except pd.errors.ParserError as e:
        reason = str(e).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
        raise SkinaugError(f"{path} is not a CSV ({reason}); {_EXPECTED}") from None
    if not isinstance(meta.index, pd.RangeIndex):  # pandas turns extra leading fields into an index
        raise SkinaugError(f"{path}: its rows have more fields than its header; {_EXPECTED}")
    return meta


def _check_columns(meta: pd.DataFrame, path: Path) -> None:
    missing = [c for c in COLUMNS if c not in meta.columns]
    if len(missing) == len(COLUMNS):
        header = ",".join(map(str, meta.columns))[:60]
        sep = next((s for s in ";\t|" if s in header), None) if len(meta.columns) == 1 else None
        fix = f"save it with commas, not {sep!r}" if sep else f"{_EXPECTED}, starting {','.join(COLUMNS[:3])},..."
        raise SkinaugError(f"{path} is not a Fitzpatrick17k metadata CSV (its header reads {header!r}); {fix}")
    if missing:
        raise SkinaugError(f"{path} lacks column(s) {', '.join(missing)}; expected the Fitzpatrick17k columns")
    if meta.empty:
        raise SkinaugError(f"{path} has a header but no rows; {_EXPECTED}")


UNKNOWN_SCALE = -1  # Fitzpatrick17k's fitzpatrick_scale for "skin type not known"
_SCALES = (1, 2, 3, 4, 5, 6, UNKNOWN_SCALE)
_SHOWN = 3  # offending rows named in one message


def _check_rows(meta: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Every row usable: a skin type in _SCALES, a label, an md5hash naming one file, on no other row."""
    scale = pd.to_numeric(meta["fitzpatrick_scale"], errors="coerce")
    _refuse(~scale.isin(_SCALES), meta["fitzpatrick_scale"], path,
            "fitzpatrick_scale must be 1 to 6, or -1 for unknown")
    _refuse(meta["label"].fillna("").str.strip() == "", meta["label"], path, "label is empty")
    md5 = meta["md5hash"].fillna("")
    _refuse((md5.str.strip() == "") | md5.str.contains(r"[/\\]") | md5.isin([".", ".."]), meta["md5hash"], path,
            "md5hash must name an image file ({md5hash}.jpg)")
    _refuse_duplicates(md5, path)
    return meta.assign(fitzpatrick_scale=scale.astype(int))


def _refuse(bad: pd.Series, values: pd.Series, path: Path, problem: str) -> None:
    """Raise naming the first few bad rows by line number (the header is line 1) and value."""
    if not bad.any():
        return
    shown = values[bad].head(_SHOWN)
    where = [f"line {i + 2} ({'empty' if pd.isna(v) else repr(str(v))})" for i, v in shown.items()]
    more = f" and {int(bad.sum()) - _SHOWN} more" if bad.sum() > _SHOWN else ""
    raise SkinaugError(f"{path}: {problem}: {', '.join(where)}{more}; fix or remove those rows")


def _refuse_duplicates(md5: pd.Series, path: Path) -> None:
    """One image on two rows could land on both sides of a split."""
    lines: dict[str, list[str]] = {}
    for i, value in md5[md5.duplicated(keep=False)].items():
        lines.setdefault(value, []).append(str(i + 2))  # the header is line 1
    if not lines:
        return
    shown = "; ".join(f"{value} on lines {', '.join(n)}" for value, n in list(lines.items())[:_SHOWN])
    more = f"; and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    raise SkinaugError(f"{path}: {len(lines)} md5hash value(s) on more than one row ({shown}{more}); "
                       "keep one row per image, or one image could land in both train and test")


def unknown_skin_type(meta: pd.DataFrame) -> pd.Series:
    """Rows whose skin type is not known (fitzpatrick_scale -1); no study can place them."""
    return meta["fitzpatrick_scale"] == UNKNOWN_SCALE


def study_subset(meta: pd.DataFrame, subset: SubsetConfig) -> pd.DataFrame:
    """The study's rows (labels x skin types), original columns and row order. Real CSV: 1,631.

    Rows of unknown skin type are always dropped, whatever subset.fitzpatrick_scales says.
    """
    absent = sorted(set(subset.labels) - set(meta["label"]))
    if absent:
        raise SkinaugError(f"label(s) {', '.join(absent)} not in the metadata; check subset.labels spelling")
    keep = (meta["label"].isin(subset.labels) & meta["fitzpatrick_scale"].isin(subset.fitzpatrick_scales)
            & ~unknown_skin_type(meta))
    if not keep.any():
        raise SkinaugError(f"no metadata row has one of subset.labels with a fitzpatrick_scale in "
                           f"{list(subset.fitzpatrick_scales)}: an empty study; check subset.fitzpatrick_scales")
    return meta[keep].reset_index(drop=True)


def table1(subset_df: pd.DataFrame, title: str | None = None) -> str:
    """Markdown counts, label x Fitzpatrick skin type with totals (paper Table 1 layout)."""
    counts = pd.crosstab(subset_df["label"], subset_df["fitzpatrick_scale"])
    scales = list(counts.columns)
    title = title or "Table 1: study subset, images per label and Fitzpatrick skin type (FST)"
    rows = [["label", *(f"FST {_ROMAN.get(s, s)}" for s in scales), "total"],
            ["---", *("---:" for _ in scales), "---:"]]
    rows += [[label, *(str(int(v)) for v in row), str(int(row.sum()))] for label, row in counts.iterrows()]
    rows.append(["total", *(str(int(v)) for v in counts.sum()), str(len(subset_df))])
    return f"{title}; {len(subset_df)} in all.\n\n" + "".join("| " + " | ".join(r) + " |\n" for r in rows)


# --- images: local folder or download ----------------------------------------------

# Some atlas servers refuse clients that do not look like a browser.
_HEADERS = {
    "User-Agent": ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/124.0 Safari/537.36"),
    "Accept": "image/avif,image/webp,image/apng,image/*,*/*;q=0.8",
}
_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def collect_images(subset_csv: Path, out_dir: Path, available_csv: Path, failures_csv: Path,
                   data_cfg: DataConfig, download_cfg: DownloadConfig) -> pd.DataFrame:
    """Make out_dir/{md5hash}.jpg for every subset row; return (and write) the rows that have one.

    From data_cfg.images_dir when set (nothing downloaded), else from each row's `url`
    (download_cfg.workers at a time, retried with back-off). Images already in out_dir
    that decode are kept, so an interrupted run resumes. Writes failures_csv (md5hash,
    url, reason) and image_counts.md beside it; stops if any image is missing unless
    data.allow_missing.
    """
    rows = load_metadata(subset_csv, None)
    with atomic.locked(out_dir):  # a second run on out_dir waits: it would delete this one's temp files
        return _collect(rows, Path(out_dir), available_csv, failures_csv, data_cfg, download_cfg)


def _collect(rows: pd.DataFrame, out_dir: Path, available_csv: Path, failures_csv: Path, data_cfg: DataConfig,
             download_cfg: DownloadConfig) -> pd.DataFrame:
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*"):  # temp files of an interrupted run
        if atomic.is_temp(leftover.name):
            leftover.unlink()

    if data_cfg.images_dir is not None:
        source = Path(data_cfg.images_dir)
        if not source.is_dir():
            raise SkinaugError(f"data.images_dir {source} is not a folder; set it to the folder of "
                               "{md5hash}.jpg files, or to null to download")
        fetch, what = (lambda row: _copy_local(row, source, out_dir)), f"from {source}"
    else:
        fetch, what = (lambda row: _download_one(row, out_dir, download_cfg)), "downloaded"
    status = _run_all(rows, fetch, download_cfg.workers)

    outcome = rows["md5hash"].map(status)
    ok = outcome.isin(["present", "fetched"])
    failed = rows.loc[~ok, ["md5hash", "url"]].assign(reason=outcome[~ok])
    atomic.write_csv(failures_csv, failed)
    available = rows[ok]
    fetched = int((outcome == "fetched").sum())
    print(f"images: {len(available)} of {len(rows)} available in {out_dir} ({len(available) - fetched} already "
          f"there, {fetched} {what}, {len(failed)} missing; see {failures_csv})")
    counts_md = Path(failures_csv).with_name("image_counts.md")
    atomic.write_text(counts_md, table1(available, title="Images available per label and skin type"))
    if len(failed) and not data_cfg.allow_missing:
        Path(available_csv).unlink(missing_ok=True)  # never leave an earlier run's list looking current
        raise SkinaugError(f"{len(failed)} of {len(rows)} images missing; see {failures_csv}; "
                           "set data.allow_missing: true to drop them")
    if len(failed):
        print(f"images: dropping {len(failed)} rows (data.allow_missing); what remains ({counts_md}):\n"
              + table1(available, title="Images available"))
    atomic.write_csv(available_csv, available)
    return available


def _run_all(rows: pd.DataFrame, fetch, workers: int) -> dict[str, str]:
    """Run fetch(row) -> "present" | "fetched" | failure reason over all rows, with a progress bar."""
    status = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch, row): row.md5hash for row in rows.itertuples(index=False)}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="images", unit="img", disable=None):
            status[futures[fut]] = fut.result()
    return status


def _copy_local(row, source: Path, out_dir: Path) -> str:
    dest = out_dir / f"{row.md5hash}.jpg"
    if _already_there(dest):
        return "present"
    found = next((p for p in (source / f"{row.md5hash}{s}" for s in _SUFFIXES) if p.exists()), None)
    if found is None:
        return f"not in {source}"
    data = found.read_bytes()
    problem = _image_problem(data)
    if problem:
        return f"{problem} ({found})"
    _store(data, dest)
    return "fetched"


_local = threading.local()


def _download_one(row, out_dir: Path, cfg: DownloadConfig) -> str:
    dest = out_dir / f"{row.md5hash}.jpg"
    if _already_there(dest):
        return "present"
    if not isinstance(row.url, str) or not row.url.startswith(("http://", "https://")):
        return f"no usable url ({row.url!r})"
    if not hasattr(_local, "session"):  # one connection pool per worker thread
        _local.session = requests.Session()
        _local.session.headers.update(_HEADERS)
    reason = "no attempt"
    for attempt in range(cfg.retries + 1):
        if attempt:
            time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
        try:
            resp = _local.session.get(row.url, timeout=cfg.timeout_s)
        except requests.Timeout:
            reason = f"timeout after {cfg.timeout_s:g} s"
            continue
        except requests.RequestException as e:
            reason = f"connection failed ({type(e).__name__})"
            continue
        if resp.status_code != 200:
            reason = f"HTTP {resp.status_code}"
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                continue  # the server may recover
            return reason  # 404 and friends will not change on a retry
        problem = _image_problem(resp.content)
        if problem:  # an error page served as 200, or a cut-off body; retrying gives the same
            return f"{problem} (HTTP 200, Content-Type {resp.headers.get('Content-Type', 'not given')})"
        _store(resp.content, dest)
        return "fetched"
    return reason


def _already_there(dest: Path) -> bool:
    """True when dest is a good image (an earlier run's); a broken one is removed, never passed on."""
    if not dest.exists():
        return False
    if _image_problem(dest.read_bytes()) is None:
        return True
    dest.unlink()
    return False


def _image_problem(data: bytes) -> str | None:
    """None when the bytes decode completely as an image, else why not (a failures CSV reason)."""
    if not data:
        return "unreadable image: empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # verify() misses truncated JPEG data; a full decode does not
    except UnidentifiedImageError:  # its message names a BytesIO object: say what the bytes look like
        return f"unreadable image: not an image format ({len(data)} bytes starting {data[:16]!r})"
    except Exception as e:  # PIL raises many types for bad data
        return f"unreadable image: {type(e).__name__}: {e}"[:160]
    return None


def _store(data: bytes, dest: Path) -> None:
    """Write image bytes to dest atomically, as JPEG (re-encoded only when they are not JPEG already)."""
    with Image.open(io.BytesIO(data)) as img:
        is_jpeg = img.format == "JPEG"
        with atomic.atomic_path(dest, sweep=False) as tmp:  # collect_images cleared the folder's leftovers
            if is_jpeg:
                tmp.write_bytes(data)
            else:
                img.convert("RGB").save(tmp, format="JPEG", quality=95)
