"""Batch parts (`batch_parts`): the part sizes, and a VAE run in parts computes what one call computes."""

import pytest
import torch

from latent_consistency import batch_parts
from latent_consistency.batch_parts import in_parts, part_size
from latent_consistency.models import LatentCodec, load_diffusion_model


def test_part_size_fills_the_budget_on_a_cpu_and_is_the_whole_batch_elsewhere():
    assert part_size(128 * 2**10, "cpu") == 32  # the world's VAE at 32 px: 32 channels × 32² × 4 bytes
    assert part_size(batch_parts.PART_BYTES + 1, torch.device("cpu")) == 1  # a Stable Diffusion image: one per part
    assert part_size(1, "cpu") == batch_parts.PART_BYTES
    assert part_size(128 * 2**10, "cuda") is None and part_size(128 * 2**10, "meta") is None
    with pytest.raises(ValueError):
        part_size(0, "cpu")


def test_in_parts_calls_fn_on_consecutive_parts_and_joins_them():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x * 2

    batch = torch.arange(10.0)
    torch.testing.assert_close(in_parts(fn, batch, 4), batch * 2, rtol=0, atol=0)
    assert calls == [4, 4, 2]
    calls.clear()
    in_parts(fn, batch, None), in_parts(fn, batch, 10)
    assert calls == [10, 10]


def test_feature_map_bytes_is_the_largest_level(tiny_sd):
    vae = load_diffusion_model(str(tiny_sd)).vae
    codec = LatentCodec(vae)
    channels = vae.config.block_out_channels
    expected = 4 * max(c * (16 >> i) * (16 >> i) for i, c in enumerate(channels))
    assert codec.feature_map_bytes(16, 16) == expected
    assert LatentCodec(vae.to(torch.bfloat16)).feature_map_bytes(16, 16) == expected // 2


def test_codec_in_parts_equals_one_call(tiny_sd, monkeypatch):
    """Encode (mean and a seeded posterior draw) and decode of a batch of 7, in parts of 2 images, against one call."""
    codec = LatentCodec(load_diffusion_model(str(tiny_sd)).vae)
    images = torch.rand(7, 3, 16, 16) * 2 - 1
    calls = []
    encode = codec.vae.encode
    monkeypatch.setattr(codec.vae, "encode", lambda x: calls.append(len(x)) or encode(x))

    one_mean = codec.encode(images)
    one_draw = codec.encode(images, torch.Generator().manual_seed(3), sample=True)
    one_decoded = codec.decode(one_mean)
    assert calls == [7, 7]
    calls.clear()

    monkeypatch.setattr(batch_parts, "PART_BYTES", 2 * codec.feature_map_bytes(16, 16))
    torch.testing.assert_close(codec.encode(images), one_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.encode(images, torch.Generator().manual_seed(3), sample=True), one_draw, rtol=0, atol=1e-6)
    torch.testing.assert_close(codec.decode(one_mean), one_decoded, rtol=0, atol=1e-5)
    assert calls == [2, 2, 2, 1] * 2
