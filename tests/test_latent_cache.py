"""The latent cache D_z = {E(x)}: written once, read back equal to encoding directly."""

import json

import pytest
import torch

from latent_consistency.data.latent_cache import LatentCache, write_latent_cache
from latent_consistency.errors import UserError
from latent_consistency.models import LatentCodec
from latent_consistency.prompts import CLIPPromptEncoder, encode_prompts
from latent_consistency.world.datasets import get_dataset
from tiny_models import make_tiny_components

SOURCE = {"dataset": "shapes", "split": "train", "resolution": 32, "seed": 0, "size": 10}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def data():
    return get_dataset("shapes", "train", size=10)


def write(path, data, parts, **kw):
    return write_latent_cache(
        data, path, LatentCodec(parts["vae"]), CLIPPromptEncoder(parts["tokenizer"], parts["text_encoder"]), SOURCE, progress=False, **kw
    )


def test_round_trip_equals_direct_encoding(tmp_path, data, parts):
    path = write(tmp_path / "cache", data, parts, batch_size=4, shard_size=4)
    cache = LatentCache(path)
    codec = LatentCodec(parts["vae"])
    assert len(cache) == len(data) == 10
    assert len(list(path.glob("shard-*.safetensors"))) == 3  # shards of 4, 4, 2
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    captions = [data[i]["caption"] for i in range(len(data))]
    direct = codec.encode(images)
    cond = encode_prompts(parts["tokenizer"], parts["text_encoder"], captions)
    for i in range(len(data)):
        item = cache[i]
        assert item["caption"] == captions[i]
        torch.testing.assert_close(item["latents"], direct[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(item["text_embedding"], cond[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.uncond_embedding, encode_prompts(parts["tokenizer"], parts["text_encoder"], [""])[0])
    tensors = cache.tensors()
    torch.testing.assert_close(tensors.text_embeddings[tensors.caption_index], cond, atol=1e-5, rtol=1e-5)
    # Repeated captions are stored once.
    assert len(tensors.text_embeddings) == len(set(captions))


def test_manifest_records_what_training_must_match(tmp_path, data, parts):
    manifest = json.loads((write(tmp_path / "cache", data, parts) / "manifest.json").read_text())
    assert manifest["num_samples"] == 10
    assert manifest["latent_channels"] == 4
    assert manifest["latent_size"] == [16, 16]  # 32 px through the tiny VAE's 2x
    assert manifest["scaling_factor"] == parts["vae"].config.scaling_factor
    assert manifest["text_hidden_size"] == parts["text_encoder"].config.hidden_size
    assert manifest["max_length"] == parts["tokenizer"].model_max_length
    assert manifest["source"] == SOURCE


def test_existing_folder_and_half_written_cache_are_refused(tmp_path, data, parts):
    path = write(tmp_path / "cache", data, parts)
    with pytest.raises(UserError, match="already exists"):
        write(path, data, parts)
    (path / "manifest.json").unlink()  # as if the writer had been killed before the manifest
    with pytest.raises(UserError, match="not a latent cache"):
        LatentCache(path)


@pytest.mark.parametrize("part", ["latents", "text embeddings"])
def test_encoding_that_overflows_is_refused_before_a_cache_is_written(tmp_path, data, parts, part, monkeypatch):
    """A float16 VAE or text encoder can overflow to inf or NaN on some images: refused while encoding, naming what to do,
    not written into a cache that training would refuse (or, before the read check, train on)."""
    codec, prompts = LatentCodec(parts["vae"]), CLIPPromptEncoder(parts["tokenizer"], parts["text_encoder"])
    broken = codec if part == "latents" else prompts
    real = broken.encode
    monkeypatch.setattr(broken, "encode", lambda *a, **k: real(*a, **k).half() * float("inf"))
    with pytest.raises(UserError, match=f"the {part} came out NaN or infinite in float16 .* encode with the model in float32"):
        write_latent_cache(data, tmp_path / "cache", codec, prompts, SOURCE, progress=False, batch_size=4)
    assert not (tmp_path / "cache").exists()
