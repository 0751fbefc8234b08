"""The built-in world with an SDXL-architecture teacher (`tiny-sdxl`): plumbing and the SDXL contract, never quality."""

import dataclasses
import json

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.conditioning import AddedConditioning
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.models import load_lcm
from latent_consistency.world import build
from latent_consistency.world.artifact import load_world
from latent_consistency.world.build import build_world, export_world
from latent_consistency.world.presets import PRESETS, JudgeConfig, QualityConfig, TextEncoderConfig, WorldPreset, get_preset
from tiny_models import load_pipeline

TINY = PRESETS["tiny-sdxl"]
# tiny-sdxl's networks and code path with fewer steps and no pretraining dataset: the build takes seconds, not minutes
FAST = dataclasses.replace(
    TINY, pretraining_datasets=(), checkpoint_every=1000, judge=JudgeConfig(steps=4, batch_size=16),
    vae=dataclasses.replace(TINY.vae, steps=4), text_encoder=dataclasses.replace(TINY.text_encoder, steps=8),
    teacher=dataclasses.replace(TINY.teacher, steps=8), quality=QualityConfig(num_samples=4, num_steps=2, grid_prompts=1, grid_samples=1, vae_samples=4),
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(FAST, tmp_path_factory.mktemp("world") / "tiny-sdxl", device="cpu", progress=False)


def test_sdxl_presets_are_the_sd_ones_with_an_sdxl_teacher():
    for name in ("tiny", "default"):
        sd, sdxl = get_preset(name), get_preset(f"{name}-sdxl")
        assert sd.teacher.architecture == "sd" and sdxl.teacher.architecture == "sdxl"
        assert dataclasses.replace(sdxl, name=name, teacher=dataclasses.replace(sdxl.teacher, architecture="sd",
                                   addition_time_embed_dim=sd.teacher.addition_time_embed_dim)) == sd
    assert WorldPreset.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_a_world_json_without_the_architecture_is_an_sd_world(tmp_path):
    spec = build.world_spec(get_preset("tiny"), "epsilon")
    del spec["preset"]["teacher"]["architecture"], spec["preset"]["teacher"]["addition_time_embed_dim"]  # as written before them
    assert WorldPreset.from_dict(spec["preset"]) == get_preset("tiny")
    (tmp_path / "world.json").write_text(json.dumps(spec))
    build._check_out_dir(tmp_path, build.world_spec(get_preset("tiny"), "epsilon"))  # resuming it is no change of settings
    from latent_consistency.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        build._check_out_dir(tmp_path, build.world_spec(TINY, "epsilon"))
    with pytest.raises(UserError, match="unknown teacher architecture 'sd3'"):
        build.check_world_spec(dataclasses.replace(TINY, teacher=dataclasses.replace(TINY.teacher, architecture="sd3")), "epsilon")
    with pytest.raises(UserError, match="at least 6"):
        build.check_world_spec(dataclasses.replace(TINY, text_encoder=TextEncoderConfig(hidden_size=4, num_heads=1)), "epsilon")


@pytest.mark.slow
def test_the_teacher_is_a_stable_diffusion_xl_pipeline_and_our_sdxl_model(world):
    from transformers import CLIPTextModelWithProjection

    pipe = load_pipeline(world)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.config.force_zeros_for_empty_prompt
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.unet.config.cross_attention_dim == 2 * TINY.text_encoder.hidden_size
    images = pipe(["a large red star at the top left"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    w = load_world(world)
    assert w.model.is_sdxl and w.model.force_zeros_for_empty_prompt and w.preset == FAST
    # The second encoder is the first with an identity projection; the tokenizer the same
    second = w.model.text_encoder_2
    assert isinstance(second, CLIPTextModelWithProjection) and w.model.tokenizer_2.get_vocab() == w.model.tokenizer.get_vocab()
    torch.testing.assert_close(second.text_projection.weight, torch.eye(TINY.text_encoder.hidden_size))
    first = dict(w.model.text_encoder.named_parameters())
    assert all(torch.equal(p, first[k.removeprefix("text_model.")]) for k, p in second.text_model.named_parameters())
    # c is what the pipeline makes: tokens, then the pooled embedding and the size numbers
    c = w.model.prompts.encode(["a small blue circle"])
    tokens, _, pooled, _ = pipe.encode_prompt("a small blue circle", do_classifier_free_guidance=False)
    added = AddedConditioning.of_unet(w.model.unet.config)
    torch.testing.assert_close(added.unpack(c)[0], tokens)
    torch.testing.assert_close(added.unpack(c)[1]["text_embeds"], pooled)


@pytest.mark.slow
def test_the_latent_cache_holds_packed_conditions_with_the_worlds_size(world):
    cache, w = LatentCache(world / "latents"), load_world(world)
    added = AddedConditioning.of_unet(w.model.unet.config)
    size = TINY.resolution
    assert cache.text_embeddings.shape[1:] == (TINY.tokenizer.max_length + 1, 2 * TINY.text_encoder.hidden_size)
    for c in (cache.text_embeddings[:3], cache.uncond_embedding[None]):
        assert added.unpack(c)[1]["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * len(c)
    torch.testing.assert_close(cache.text_embeddings[:3], w.model.prompts.encode(cache.captions[:3]))
    # ∅ (what caption dropout trains on): zero tokens and pooled embedding, the size numbers kept
    tokens, uncond = added.unpack(cache.uncond_embedding[None])
    assert not tokens.any() and not uncond["text_embeds"].any()


@pytest.mark.slow
def test_distilling_the_world_exports_an_sdxl_lcm_and_the_export_keeps_both_encoders(world, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(world), "--data", str(world / "latents"), "--out", str(out)]) == 0
    pipe = load_pipeline(out / "lcm")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "LCMScheduler"
    lcm = load_lcm(str(out / "lcm"))
    assert lcm.is_sdxl and lcm.time_cond_proj_dim is not None
    exported = export_world(world, tmp_path / "fp16")
    assert (exported / "text_encoder_2").is_dir() and (exported / "tokenizer_2").is_dir()
    assert load_world(exported).model.is_sdxl
