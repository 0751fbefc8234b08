import json

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from latent_consistency.errors import UserError
from latent_consistency.models import (
    LatentCodec,
    lcm_scheduler_config,
    load_diffusion_model,
    load_lcm,
    make_student_unet,
    save_lcm_pipeline,
)
from latent_consistency.parameterization import guidance_embedding


def test_load_teacher_reads_prediction_type(tmp_path):
    from tiny_models import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "v-teacher", prediction_type="v_prediction")
    model = load_diffusion_model(str(folder))
    assert model.prediction_type == "v_prediction"
    assert model.time_cond_proj_dim is None


def test_student_starts_as_teacher(tiny_sd):
    teacher = load_diffusion_model(str(tiny_sd))
    student = make_student_unet(teacher.unet, time_cond_proj_dim=256).eval()
    assert student.config.time_cond_proj_dim == 256
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 16, 32)
    with torch.no_grad():
        ref = teacher.unet(z, t, encoder_hidden_states=cond).sample
        out = student(z, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(torch.tensor([3.0, 9.0]), 256)).sample
    torch.testing.assert_close(out, ref)


def test_saved_student_loads_in_diffusers_and_in_ours(tiny_sd, tmp_path):
    teacher = load_diffusion_model(str(tiny_sd))
    student = make_student_unet(teacher.unet, time_cond_proj_dim=64)
    config = lcm_scheduler_config(teacher.scheduler_config, skip=20)
    out = save_lcm_pipeline(tmp_path / "student", student, teacher, config)
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))

    pipe = LatentConsistencyModelPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.original_inference_steps == 50
    images = pipe("a red star", num_inference_steps=2, guidance_scale=8.0, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)

    ours = load_lcm(str(out))
    assert ours.time_cond_proj_dim == 64 and ours.scheduler_config["original_inference_steps"] == 50


def test_diffusers_saved_lcm_loads_with_ours(tiny_lcm):
    model = load_lcm(str(tiny_lcm))
    assert model.time_cond_proj_dim == 32
    assert json.loads((tiny_lcm / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"


def test_teacher_without_omega_input_is_not_an_lcm(tiny_sd):
    with pytest.raises(UserError, match="without the guidance input.*lcm distill"):
        load_lcm(str(tiny_sd))


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_diffusion_model(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.txt").write_text("x")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        load_diffusion_model(str(tmp_path / "junk"))


def test_latent_codec_applies_scaling_factor_once(tiny_sd):
    model = load_diffusion_model(str(tiny_sd))
    codec = LatentCodec(model.vae)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = codec.encode(images)
    raw = model.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, raw * model.vae.config.scaling_factor)
    assert codec.downsampling_factor == 2 and latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(codec.decode(latents), model.vae.decode(raw).sample)


def test_student_from_a_freshly_built_unet(tmp_path):
    """A UNet built in code (config with private default-tracking keys) still gets the ω input."""
    from tiny_models import make_tiny_components

    unet = make_tiny_components(tmp_path)["unet"]
    student = make_student_unet(unet, time_cond_proj_dim=16)
    assert student.time_embedding.cond_proj is not None and student.config.time_cond_proj_dim == 16


def test_unreachable_hub_id_is_a_user_error():
    # HF_HUB_OFFLINE=1 (conftest): a hub id that is not cached fails at once, as one line.
    with pytest.raises(UserError, match="cannot load a diffusers model from someone/not-cached"):
        load_diffusion_model("someone/not-cached")
