"""The README's Python examples run as written (on a tiny LCM in place of the demo's `runs/demo/distill/lcm`): the
generator's one call ends in a PNG of the model's size, and Algorithm 3 by hand in a latent of its size."""

import re
from pathlib import Path

import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = '"runs/demo/distill/lcm"'


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "the README has two Python examples: LCMGenerator, and Algorithm 3 by hand"
    assert all(MODEL in block for block in blocks)
    return blocks


def _run(block: str, model) -> dict:
    namespace: dict = {}
    exec(block.replace(MODEL, repr(str(model))), namespace)
    return namespace


def test_readme_generator_example_saves_a_png(tiny_lcm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes star.png where it runs
    namespace = _run(_blocks()[0], tiny_lcm)
    size = namespace["generator"].model.native_size
    with Image.open(tmp_path / "star.png") as image:
        assert image.size == (size, size) and image.mode == "RGB"
    assert torch.isfinite(namespace["images"]).all()


def test_readme_algorithm_3_example_runs(tiny_lcm):
    namespace = _run(_blocks()[1], tiny_lcm)
    z0, model = namespace["z0"], namespace["model"]
    size = model.unet.config.sample_size
    assert z0.shape == (1, model.unet.config.in_channels, size, size)
    assert torch.isfinite(z0).all()
