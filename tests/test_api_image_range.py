"""`LCMGenerator` and `SolverGenerator` return images in [-1, 1], as their docstrings and README say: the VAE's output
overshoots that range (a trained SDXL VAE's samples reach 1.9), and diffusers' postprocessing clamps it; a caller who
converted with ((x + 1) * 127.5).byte() got wrapped-around pixels. Simulated with a decoder whose output overshoots."""

import pytest
import torch

from latent_consistency.pipelines import LCMGenerator, SolverGenerator


@pytest.mark.parametrize("kind", ["lcm", "solver"])
def test_images_are_clamped_to_the_unit_range(kind, tiny_lcm, tiny_sd, monkeypatch):
    generator = LCMGenerator.load(str(tiny_lcm)) if kind == "lcm" else SolverGenerator.load(str(tiny_sd))
    codec_class = type(generator.model.codec)
    decode, raw = codec_class.decode, []

    def overshooting(codec, latents):
        images = decode(codec, latents) * 3 + 0.5
        raw.append(images)
        return images

    monkeypatch.setattr(codec_class, "decode", overshooting)
    images = generator(["a red star", "a blue ring"], steps=2, seeds=[0, 1])
    assert raw[-1].min() < -1 and raw[-1].max() > 1  # the decoder's output overshoots on both sides
    assert torch.equal(images, raw[-1].clamp(-1, 1))
