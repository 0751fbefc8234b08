"""`lcm cache`: an image folder encoded once into the latent cache that `lcm distill` and `lcm finetune` take as --data."""

import torch

from latent_consistency.data.images import load_rgb
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.models import load_diffusion_model
from tiny_models import write_captioned_images


def test_cache_holds_the_models_latents_of_each_image_and_a_run_trains_on_it(tiny_sd, tmp_path, run_error):
    """Was: no command wrote a cache (the guide recommended one, `write_latent_cache` was Python only)."""
    images = write_captioned_images(tmp_path / "images", 5, caption="a red star number {i}", size=(20, 16))
    cache = tmp_path / "cache"
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(cache), "--batch-size", "2"])
    assert code == 0, err
    model = load_diffusion_model(str(tiny_sd))
    read = LatentCache(cache)
    assert len(read) == 5 and list(read.captions) == [f"a red star number {i}" for i in range(5)]
    pixels = torch.stack([load_rgb(images / f"{i}.png", model.native_size) for i in range(5)])  # as a run decodes them
    torch.testing.assert_close(read.latents, model.codec.encode(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read.text_embeddings, model.prompts.encode(list(read.captions), "cpu"), rtol=1e-5, atol=1e-5)
    out = tmp_path / "run"
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(cache), "--out", str(out),
                           "--steps", "1"])
    assert code == 0 and (out / "lcm" / "model_index.json").is_file(), err
    # an existing folder, a cache as --data: one line each, the cache untouched
    before = sorted(p.name for p in cache.iterdir())
    for data, words in ((images, "already exists"), (cache, "is a latent cache already")):
        code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(data), "--out", str(cache if data == images else tmp_path / "c2")])
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert sorted(p.name for p in cache.iterdir()) == before and not (tmp_path / "c2").exists()
