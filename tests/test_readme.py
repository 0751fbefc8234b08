"""The README's Python example runs as written (on a tiny LCM in place of `runs/lcd/lcm`)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_lcm):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    assert '"runs/lcd/lcm"' in blocks[0]
    namespace: dict = {}
    exec(blocks[0].replace('"runs/lcd/lcm"', repr(str(tiny_lcm))), namespace)
    z0, model = namespace["z0"], namespace["model"]
    size = model.unet.config.sample_size
    assert z0.shape == (1, model.unet.config.in_channels, size, size)
    assert torch.isfinite(z0).all()
