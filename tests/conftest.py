"""Shared fixtures: the real params.yaml (shrunk per test) and a tiny base model built in code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from skinaug import config

ROOT = Path(__file__).resolve().parents[1]

# Nothing in the test suite may touch the network: the hub client fails at once instead.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TORCH_HOME", str(ROOT / ".pytest_cache" / "torch"))

torch.set_num_threads(int(os.environ.get("SKINAUG_TEST_THREADS", "2")))


TONE_EFFECT = "test_tone_effect.py"  # waits for the demo base pretrained beside the other tests (demobase.py)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook signature
    items.sort(key=lambda item: item.path.name == TONE_EFFECT)  # last (a stable sort keeps the rest's order)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(item.path.name == TONE_EFFECT for item in session.items):
        import demobase

        demobase.start(session.config)


@pytest.fixture(autouse=True, scope="module")
def _stop_warm_processes():
    """The warm processes a module's throwaway DVC repositories started (dvcrepo.Repo.dvc) end with it."""
    yield
    import dvcrepo

    dvcrepo.stop_servers()


@pytest.fixture(scope="session")
def repo_cfg() -> config.Config:
    """The committed params.yaml (the demo profile); tests shrink it with dataclasses.replace."""
    return config.load(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD 2.1-family diffusers folder (built once per test session)."""
    from skinaug.demo import tinymodel

    return tinymodel.build(tmp_path_factory.mktemp("base") / "base", seed=0, resolution=32)


@pytest.fixture(scope="session")
def world_dir(repo_cfg, tmp_path_factory) -> Path:
    """The demo world (metadata.csv + images/) from params.yaml's world section, made once per session (~5 s)."""
    from skinaug.demo import world

    out = tmp_path_factory.mktemp("world") / "world"
    world.make_world(repo_cfg.world, repo_cfg.subset, out)
    return out


@pytest.fixture(scope="session")
def fitz_csv() -> Path:
    """The real fitzpatrick17k.csv named by env SKINAUG_FITZ_CSV; tests that need it skip when unset."""
    path = os.environ.get("SKINAUG_FITZ_CSV")
    if not path:
        pytest.skip("real-data check: set SKINAUG_FITZ_CSV to fitzpatrick17k.csv (e.g. ../shared/data/fitzpatrick17k.csv)")
    if not Path(path).is_file():
        pytest.fail(f"SKINAUG_FITZ_CSV={path} is not a file")
    return Path(path)


@pytest.fixture
def params_file(tmp_path):
    """A function writing the committed params.yaml with some sections' keys changed, returning its path.

    params_file(data={"allow_missing": True}) -> tmp_path/params.yaml, for `skinaug --params`.
    """
    import yaml

    def write(**sections) -> Path:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        for section, values in sections.items():
            raw[section].update(values)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write
