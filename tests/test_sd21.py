"""Loading a base model (skinaug.diffusion.sd21): a folder that is not a model, or a damaged one, fails in one line."""
from __future__ import annotations

import shutil

import pytest

from skinaug import SkinaugError
from skinaug.diffusion import sd21


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    every_part = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    with pytest.raises(SkinaugError, match=f"missing {every_part};"):
        sd21.load_components(tmp_path / "empty")


# --- bad models and adapters: one line naming the path, before anything loads them -------------


def _one_line(err, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


def _cut(path):
    """Truncate a file as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rm(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


BASE_DAMAGE = {  # case: (what happens to a copy of the base, what the message names)
    **{part: (lambda base, part=part: _rm(base / part), f"missing {part}/")
       for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
    "model_index": (lambda base: _rm(base / "model_index.json"), "missing model_index.json"),
    "vocabulary": (lambda base: _rm(base / "tokenizer/tokenizer.json"),  # it used to load as a 2-token tokenizer
                   "missing tokenizer/tokenizer.json"),
    "text_encoder_config": (lambda base: _rm(base / "text_encoder/config.json"), "missing text_encoder/config.json"),
    "truncated_unet": (lambda base: _cut(base / "unet/diffusion_pytorch_model.safetensors"),
                       "unet/diffusion_pytorch_model.safetensors is damaged or truncated"),
    "truncated_text_encoder": (lambda base: _cut(base / "text_encoder/model.safetensors"),
                               "text_encoder/model.safetensors is damaged or truncated"),
    "damaged_config": (lambda base: _cut(base / "scheduler/scheduler_config.json"),
                       "scheduler/scheduler_config.json is damaged"),
}


@pytest.mark.parametrize("case", BASE_DAMAGE)
def test_incomplete_or_damaged_base_is_one_line_naming_the_path(tiny_base, tmp_path, case):
    damage, named = BASE_DAMAGE[case]
    base = shutil.copytree(tiny_base, tmp_path / "base")  # a real copy: the damage must not reach tiny_base
    damage(base)
    with pytest.raises(SkinaugError) as err:
        sd21.load_components(base)
    _one_line(err, f"cannot load base model {base}", named, "dvc repro base")


