"""The parts of two review fixes that live in the library (`models`, `data.latent_cache`), beside `test_style_lora_cache_out_card_names`'s:
- `--style-lora s.safetensors:0.5`, a file of that very name, is that file at weight 1: it was refused as "a PyTorch
  pickle" by its suffix (and diffusers, going by the name, would have unpickled it).
- `lcm cache --out X`, X an empty folder or a link to one, writes the cache there (was: "already exists"), and a stopped
  cache into it resumes.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from latent_consistency.data.latent_cache import LatentCache
from test_cache_resume import images as captioned_images
from test_cache_resume import killed, snapshot, write
from tiny_models import save_tiny_lora, write_captioned_images


def test_a_style_lora_file_named_with_a_colon_samples_as_that_file_at_weight_1(tiny_lcm, tmp_path, run_error):
    style = save_tiny_lora(tmp_path / "style", tiny_lcm, seed=5) / "pytorch_lora_weights.safetensors"
    named = shutil.copy(style, tmp_path / "s.safetensors:0.5")
    images = {}
    for name, given in (("named", ["--style-lora", str(named)]), ("plain", ["--style-lora", f"{style}:1"]), ("none", [])):
        out = tmp_path / name
        code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), *given, "--steps", "1", "--out", str(out),
                               "--device", "cpu"])
        assert code == 0, err
        images[name] = np.asarray(Image.open(next(out.glob("*.png"))))  # the pixels: the file's record names the LoRA
    assert np.array_equal(images["named"], images["plain"]) and not np.array_equal(images["named"], images["none"])
    pickled = tmp_path / "p.safetensors:0.5"
    torch.save(load_file(style), pickled)  # a pickle under a safetensors name: refused, not unpickled
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--style-lora", str(pickled), "--out",
                           str(tmp_path / "refused"), "--device", "cpu"])
    assert code == 2 and "a PyTorch pickle, which is not loaded here" in err.splitlines()[-1], err


def test_lcm_cache_writes_into_an_empty_folder_or_the_one_a_link_points_to(tiny_sd, tmp_path, run_error):
    data = write_captioned_images(tmp_path / "images", 3)
    new, empty, target, link = tmp_path / "new", tmp_path / "empty", tmp_path / "target", tmp_path / "link"
    empty.mkdir()
    target.mkdir()
    link.symlink_to(target)
    for out in (new, empty, link):
        code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(data), "--out", str(out), "--device", "cpu"])
        assert code == 0, err
    assert link.is_symlink() and len(LatentCache(link)) == len(LatentCache(empty)) == 3
    assert snapshot(target) == snapshot(empty) == snapshot(new)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []


def test_a_stopped_cache_into_an_empty_folder_resumes(tiny_sd, tmp_path, monkeypatch):
    from latent_consistency.models import load_diffusion_model

    model = load_diffusion_model(str(tiny_sd))
    data = captioned_images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    out = tmp_path / "cache"
    out.mkdir()
    assert killed(model, data, out, monkeypatch).is_dir() and list(out.iterdir()) == []
    notes = []
    write(model, data, out, notes)
    assert any("resum" in note for note in notes), notes
    assert snapshot(out) == snapshot(tmp_path / "whole")
