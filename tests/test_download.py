"""Collecting images (skinaug.data.collect_images) from a local HTTP server and a local folder.

The server runs in a thread on 127.0.0.1 and counts requests, so the tests see what was
fetched again and what was not; nothing leaves the machine.
"""
from __future__ import annotations

import io
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from skinaug import SkinaugError, cli
from skinaug.config import DataConfig, DownloadConfig
from skinaug.data import fitzpatrick

FAST = DownloadConfig(workers=4, timeout_s=0.5, retries=1, backoff_s=0.01)


def _image_bytes(fmt: str, colour=(200, 120, 100)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


JPEG, PNG = _image_bytes("JPEG"), _image_bytes("PNG")
# A photo-like JPEG cut short of its end: PIL's verify() passes it, only a full decode fails.
_noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
_buf = io.BytesIO()
_noise.save(_buf, format="JPEG")
CUT_JPEG = _buf.getvalue()[:-100]


class _Handler(BaseHTTPRequestHandler):
    """/jpg/*, /png/*: images; /gone: 404; /slow: answers after 3 s; /html: a page, not an image;
    /cut: a JPEG cut short; /flaky: 503 on the first request, then an image."""

    def do_GET(self):  # noqa: N802 - http.server's name
        with self.server.lock:
            self.server.hits[self.path] += 1
            hits = self.server.hits[self.path]
        kind = self.path.split("/")[1]
        if kind == "slow":
            time.sleep(3)
        status, body = {
            "jpg": (200, JPEG), "png": (200, PNG), "slow": (200, JPEG), "gone": (404, b"not found"),
            "html": (200, b"<html>hotlink protection</html>"), "cut": (200, CUT_JPEG),
            "flaky": (503 if hits == 1 else 200, JPEG),
        }[kind]
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/html" if kind in ("html", "gone") else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.lock = Counter(), threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _subset(tmp_path, server, paths: list[str]):
    """A subset CSV with the real columns whose urls point at the test server."""
    rows = pd.DataFrame({
        "md5hash": [f"{i:032x}" for i in range(len(paths))],
        "fitzpatrick_scale": [1, 2, 5, 6] * (len(paths) // 4) + [1, 2, 5, 6][: len(paths) % 4],
        "fitzpatrick_centaur": 1, "label": "psoriasis", "nine_partition_label": "inflammatory",
        "three_partition_label": "non-neoplastic", "qc": None,
        "url": [server.url + p if server else f"https://example.invalid{p}" for p in paths],
        "url_alphanum": "x",
    })
    path = tmp_path / "subset.csv"
    rows.to_csv(path, index=False)
    return path, rows


def _data_cfg(images_dir=None, allow_missing=False) -> DataConfig:
    return DataConfig(source="fitzpatrick17k", metadata="unused.csv", metadata_md5=None,
                      images_dir=None if images_dir is None else str(images_dir), allow_missing=allow_missing)


def _collect(tmp_path, subset_csv, cfg, download=FAST):
    return fitzpatrick.collect_images(subset_csv, tmp_path / "images", tmp_path / "available.csv",
                               tmp_path / "reports" / "failures.csv", cfg, download)


def test_download_keeps_good_images_and_reports_each_failure(tmp_path, server):
    paths = ["/jpg/a", "/png/b", "/flaky/c", "/gone/d", "/slow/e", "/html/f", "/cut/g"]
    subset_csv, rows = _subset(tmp_path, server, paths)
    start = time.monotonic()
    available = _collect(tmp_path, subset_csv, _data_cfg(allow_missing=True))
    assert time.monotonic() - start < 5  # the slow server is cut off at timeout_s, not waited for

    assert available["md5hash"].tolist() == rows["md5hash"][:3].tolist()
    for md5 in available["md5hash"]:
        with Image.open(tmp_path / "images" / f"{md5}.jpg") as img:
            assert img.format == "JPEG"  # the PNG was converted
    assert (tmp_path / "images" / f"{rows.md5hash[0]}.jpg").read_bytes() == JPEG  # JPEG kept byte for byte
    failures = pd.read_csv(tmp_path / "reports" / "failures.csv").set_index("url")["reason"]
    assert failures[server.url + "/gone/d"] == "HTTP 404"
    assert failures[server.url + "/slow/e"].startswith("timeout")
    assert failures[server.url + "/html/f"] == ("unreadable image: not an image format (31 bytes starting "
                                                "b'<html>hotlink pr') (HTTP 200, Content-Type text/html)")
    assert failures[server.url + "/cut/g"].startswith("unreadable image: OSError: image file is truncated")
    assert sorted(p.stem for p in (tmp_path / "images").iterdir()) == sorted(available["md5hash"])
    # Retries: transient failures are retried once (retries=1), permanent ones are not.
    assert server.hits["/flaky/c"] == 2 and server.hits["/slow/e"] == 2
    assert server.hits["/gone/d"] == 1 and server.hits["/html/f"] == 1 and server.hits["/cut/g"] == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "available.csv", dtype={"md5hash": str}),
                                  available.reset_index(drop=True), check_dtype=False)
    counts = (tmp_path / "reports" / "image_counts.md").read_text()
    assert "| psoriasis | 1 | 1 | 1 | 3 |" in counts


def test_missing_images_stop_the_stage_unless_allowed(tmp_path, server):
    subset_csv, _ = _subset(tmp_path, server, ["/jpg/a", "/gone/b", "/jpg/c", "/gone/d"])
    (tmp_path / "available.csv").write_text("stale from an earlier run\n")
    with pytest.raises(SkinaugError) as err:
        _collect(tmp_path, subset_csv, _data_cfg())
    failures_csv = tmp_path / "reports" / "failures.csv"
    assert str(err.value) == (f"2 of 4 images missing; see {failures_csv}; "
                              "set data.allow_missing: true to drop them")
    assert not (tmp_path / "available.csv").exists()
    assert len(pd.read_csv(failures_csv)) == 2
    assert not list((tmp_path / "images").glob(".*"))  # no half-written files


def test_interrupted_download_resumes(tmp_path, server):
    subset_csv, rows = _subset(tmp_path, server, ["/jpg/a", "/jpg/b", "/jpg/c", "/png/d"])
    _collect(tmp_path, subset_csv, _data_cfg())
    assert sum(server.hits.values()) == 4
    # An interrupted run leaves a truncated image and a temp file behind.
    images = tmp_path / "images"
    broken = images / f"{rows.md5hash[1]}.jpg"
    broken.write_bytes(JPEG[: len(JPEG) // 2])
    (images / f".{rows.md5hash[2]}.jpg.abc123.tmp.jpg").write_bytes(JPEG[:10])
    available = _collect(tmp_path, subset_csv, _data_cfg())
    assert len(available) == 4
    assert server.hits == Counter({"/jpg/a": 1, "/jpg/b": 2, "/jpg/c": 1, "/png/d": 1})  # only the broken one again
    assert broken.read_bytes() == JPEG
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{m}.jpg" for m in rows.md5hash)
    failures = pd.read_csv(tmp_path / "reports" / "failures.csv")
    assert list(failures.columns) == ["md5hash", "url", "reason"] and failures.empty  # header even when empty


def test_local_folder_is_used_without_any_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("collect_images touched the network")

    monkeypatch.setattr(requests.Session, "request", no_network)
    subset_csv, rows = _subset(tmp_path, None, ["/a", "/b", "/c", "/d", "/e"])
    owners = tmp_path / "owners"
    owners.mkdir()
    (owners / f"{rows.md5hash[0]}.jpg").write_bytes(JPEG)
    (owners / f"{rows.md5hash[1]}.png").write_bytes(PNG)
    (owners / f"{rows.md5hash[2]}.jpeg").write_bytes(JPEG)
    (owners / f"{rows.md5hash[3]}.jpg").write_bytes(b"not an image")
    # rows.md5hash[4] is absent

    with pytest.raises(SkinaugError, match="2 of 5 images missing"):
        _collect(tmp_path, subset_csv, _data_cfg(owners))
    available = _collect(tmp_path, subset_csv, _data_cfg(owners, allow_missing=True))
    assert available["md5hash"].tolist() == rows.md5hash[:3].tolist()
    assert (tmp_path / "images" / f"{rows.md5hash[0]}.jpg").read_bytes() == JPEG
    with Image.open(tmp_path / "images" / f"{rows.md5hash[1]}.jpg") as img:
        assert img.format == "JPEG"
    reasons = pd.read_csv(tmp_path / "reports" / "failures.csv")["reason"].tolist()
    assert reasons[0].startswith("unreadable image: ") and reasons[0].endswith(f"({owners}/{rows.md5hash[3]}.jpg)")
    assert reasons[1] == f"not in {owners}"

    with pytest.raises(SkinaugError, match="is not a folder"):
        _collect(tmp_path, subset_csv, _data_cfg(tmp_path / "nowhere"))


# A researcher's own folder: what can be wrong with a {md5hash}.jpg file.
BROKEN = {"empty": b"", "truncated": CUT_JPEG, "text": b"not an image",
          "html": b"<html>Access denied</html>", "cut PNG": PNG[:40]}


@pytest.mark.parametrize("allow_missing", [False, True])
def test_unreadable_local_images_are_failures_not_crashes(tmp_path, params_file, allow_missing):
    subset_csv, rows = _subset(tmp_path, None, ["/ok", *BROKEN])
    owners, images = tmp_path / "owners", tmp_path / "images"
    owners.mkdir()
    (owners / f"{rows.md5hash[0]}.jpg").write_bytes(JPEG)
    for md5, content in zip(rows.md5hash[1:], BROKEN.values()):
        (owners / f"{md5}.jpg").write_bytes(content)
    images.mkdir()
    (images / f"{rows.md5hash[1]}.jpg").write_bytes(JPEG[:20])  # an earlier run's broken copy
    params = params_file(data={"images_dir": str(owners), "allow_missing": allow_missing})
    available, failures = tmp_path / "available.csv", tmp_path / "failures.csv"
    out = CliRunner().invoke(cli.main, ["--params", str(params), "images", str(subset_csv), str(images),
                                        "--available", str(available), "--failures", str(failures)])

    reported = pd.read_csv(failures, dtype={"md5hash": str})
    assert reported["md5hash"].tolist() == rows.md5hash[1:].tolist()
    assert reported["reason"].str.startswith("unreadable image: ").all(), reported["reason"].tolist()
    assert reported["reason"][0].startswith("unreadable image: empty (0 bytes)")
    assert reported["reason"][1].startswith("unreadable image: OSError: image file is truncated")
    assert sorted(p.name for p in images.iterdir()) == [f"{rows.md5hash[0]}.jpg"]  # no broken image, no temp file
    if allow_missing:
        assert out.exit_code == 0, out.output
        assert pd.read_csv(available, dtype={"md5hash": str})["md5hash"].tolist() == [rows.md5hash[0]]
    else:
        assert out.exit_code == 1 and isinstance(out.exception, SystemExit), out.output  # refused, not crashed
        errors = [line for line in out.output.splitlines() if line.startswith("Error")]
        assert errors == [f"Error: 5 of 6 images missing; see {failures}; set data.allow_missing: true to drop them"]
        assert not available.exists()
