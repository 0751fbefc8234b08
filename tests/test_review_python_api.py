"""The Python API as an ML engineer uses it (`LCMGenerator`, `SolverGenerator`, `load_diffusion_model`, `add_style_loras`,
`save_pipeline`), with inputs no other test gives: a mistake is a one-line `UserError` saying what to do, before any work,
never a deep torch/diffusers traceback, a silently wrong model or a folder that does not load back."""

from pathlib import Path

import numpy as np
import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.models import add_style_loras, load_diffusion_model, load_lcm, load_lcm_lora, save_pipeline
from latent_consistency.pipelines import LCMGenerator, SolverGenerator
from test_api_inputs import call as api_call
from tiny_models import save_tiny_lora

PROMPTS = ["a red star"]


@pytest.fixture(scope="module")
def lcm(tiny_lcm):
    return LCMGenerator.load(str(tiny_lcm))


@pytest.fixture(scope="module")
def lora(tiny_sd, tmp_path_factory):
    """A random LoRA of the tiny SD UNet (it fits the tiny LCM's UNet too: the same architecture)."""
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "lora", tiny_sd)


def call(generator, **changes):
    """A two-step call of `generator` with `changes` to the arguments of a valid one (`test_api_inputs.call`)."""
    return api_call(generator, steps=2, **changes)


@pytest.mark.parametrize("changes", [dict(prompts=["a \ud800 star"]), dict(negative_prompts=["\udcff"])])
def test_a_prompt_that_is_not_utf8_is_refused_naming_it(lcm, changes):
    # was: TypeError "TextEncodeInput must be Union[...]" from the tokenizer
    with pytest.raises(UserError, match=r"prompts\[0\] is not UTF-8 text"):
        call(lcm, **changes)


@pytest.mark.parametrize("timesteps", [4, np.int64(999), "999"])
def test_timesteps_given_as_a_number_are_refused_with_how_to_make_them(lcm, timesteps):
    # was: TypeError "'int' object is not iterable" (a user who meant 4 steps). None is no longer refused: it samples the
    # default steps (tests/test_api_defaults.py)
    with pytest.raises(UserError, match=r"e\.g\. generator\.timesteps\(4\) for 4 steps"):
        call(lcm, timesteps=timesteps)


@pytest.mark.parametrize("timesteps", [torch.tensor([[999], [499]]), np.array([[999, 499]])])
def test_timesteps_of_more_than_one_dimension_are_refused(lcm, timesteps):
    with pytest.raises(UserError, match="one timestep per step"):  # was: flattened and sampled
        call(lcm, timesteps=timesteps)


def test_timesteps_as_an_array_a_0d_tensor_or_an_iterator_still_sample_alike(lcm):
    reference = call(lcm, timesteps=[999, 499])
    for timesteps in (np.array([999, 499]), (t for t in (999, 499))):
        assert torch.equal(call(lcm, timesteps=timesteps), reference)
    assert torch.equal(call(lcm, timesteps=torch.tensor(999)), call(lcm, timesteps=[999]))


@pytest.mark.parametrize(("gamma", "message"), [
    ("0.5", "gamma must be a number"),  # was: TypeError from `<=`
    (True, "gamma must be a number"),  # was: sampled as γ = 1
    (1.0000001, "got 1.0000001"),  # was: "got 1", which is in [0, 1]
])
def test_gamma_must_be_a_number_in_the_unit_interval(lcm, gamma, message):
    with pytest.raises(UserError, match=message):
        call(lcm, gamma=gamma)


def test_gamma_at_its_edges_and_as_numpy_numbers_samples(lcm):
    assert torch.equal(call(lcm, gamma=np.float64(0.3)), call(lcm, gamma=0.3))
    for gamma in (0, 1, 0.0, 1.0):
        assert call(lcm, gamma=gamma).isfinite().all()


@pytest.mark.parametrize(("changes", "message"), [
    (dict(strength="0.5"), "strength must be a number"),  # was: ValueError "Unknown format code 'g'"
    (dict(negative_prompts=["blue"], negative_scale="0.5"), "negative_scale must be a number"),  # was: TypeError from math.isfinite
    (dict(negative_prompts=["blue"], negative_scale=True), "negative_scale must be a number"),
])
def test_strength_and_negative_scale_must_be_numbers(lcm, changes, message):
    with pytest.raises(UserError, match=message):
        call(lcm, **changes)


def test_a_model_moved_after_its_generator_was_made_is_one_line_and_moving_it_back_works(tiny_lcm):
    generator = LCMGenerator.load(str(tiny_lcm))
    reference = call(generator)
    for module in (generator.model.unet, generator.model.vae, generator.model.text_encoder):
        module.to(torch.float64)  # and back to float32 below without rounding
    with pytest.raises(UserError, match="weights are torch.float64 but the generator's dtype is torch.float32"):
        call(generator)  # was: RuntimeError "expected m1 and m2 to have the same dtype" in the first Linear
    for module in (generator.model.unet, generator.model.vae, generator.model.text_encoder):
        module.to(torch.float32)
    assert torch.equal(call(generator), reference)
    generator.model.vae.to("meta")  # a part moved alone: the VAE decodes last, after all the sampling
    with pytest.raises(UserError, match="the model is on meta but the generator's device is cpu"):
        call(generator)  # was: RuntimeError "Tensor on device meta is not on the expected device cpu!"


def test_solver_generator_loads_with_defaults_and_checks_its_sampler_before_the_model(tiny_sd, tmp_path):
    solver = SolverGenerator.load(str(tiny_sd))  # was: TypeError, 3 required arguments missing
    assert (solver.device, solver.dtype, solver.sampler) == (torch.device("cpu"), torch.float32, "ddim")
    assert call(solver).isfinite().all()
    with pytest.raises(UserError, match="unknown sampler 'euler'; use one of ddim, dpm, dpm"):  # was: "model folder ... does not exist"
        SolverGenerator.load(str(tmp_path / "not-loaded"), sampler="euler")


def test_models_and_loras_may_be_given_as_pathlib_paths(tiny_lcm, tiny_sd, lora, lcm):
    # was: AttributeError "'PosixPath' object has no attribute 'partition'" in the hub-id check
    assert torch.equal(call(LCMGenerator.load(Path(tiny_lcm))), call(lcm))
    model = load_lcm_lora(Path(tiny_sd), Path(lora))
    assert model.source == str(tiny_sd) and model.is_lcm
    assert load_diffusion_model(Path(tiny_sd)).source == str(tiny_sd)


@pytest.mark.parametrize("dtype", ["float16", torch.int8, np.float16])
def test_the_dtype_must_be_a_floating_point_torch_dtype(tiny_sd, dtype):
    # was: "float16" loaded in float32 with only diffusers' logged warning; torch.int8 failed in the VAE's constructor
    with pytest.raises(UserError, match="dtype must be a floating-point torch.dtype"):
        load_diffusion_model(str(tiny_sd), dtype=dtype)


@pytest.mark.parametrize(("styles", "message"), [
    (("papercut.safetensors", 0.8), "must be a (LoRA, weight) pair"),  # one pair, not a list of pairs: was ValueError on unpacking
    ("papercut.safetensors", "must be a list of (LoRA, weight) pairs"),  # was: ValueError, one LoRA per character
    ([("papercut.safetensors",)], "must be a (LoRA, weight) pair"),
    ([("papercut.safetensors", "0.8")], "must be a finite number"),  # was: TypeError from math.isfinite
    ([("papercut.safetensors", True)], "must be a finite number"),  # was: loaded at weight 1
])
def test_malformed_style_loras_are_refused_before_the_model_loads(tmp_path, styles, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LCMGenerator.load(str(tmp_path / "not-loaded"), style_loras=styles)


def test_style_loras_added_to_a_model_that_has_some_say_how_to_give_them(tiny_lcm, lora):
    model = add_style_loras(load_lcm(str(tiny_lcm)), [(str(lora), 0.5)])
    # was: "cannot load the LoRA ...: Adapter name style_0 already in use", and a second set would set the first's weight to 1
    with pytest.raises(UserError, match=r"already carries style LoRAs \(style_0\); give every style LoRA in one call"):
        add_style_loras(model, [(str(lora), 0.7)])


def test_a_pipeline_whose_unet_carries_lora_adapters_is_not_saved_and_the_fused_one_round_trips(tiny_sd, lora, tmp_path):
    model = load_lcm_lora(str(tiny_sd), str(lora))
    generator = LCMGenerator(model, torch.device("cpu"), torch.float32)
    reference = call(generator, guidance_scale=1.0)
    # was: saved with peft's layer names (to_q.base_layer.weight), a folder whose UNet no loader reads back
    with pytest.raises(UserError, match=r"unet carries LoRA adapters \(default_0\).*unet\.fuse_lora\(\); unet\.unload_lora\(\)"):
        save_pipeline(tmp_path / "lcm", model.unet, model, model.scheduler_config)
    assert not (tmp_path / "lcm").exists()
    model.unet.fuse_lora()
    model.unet.unload_lora()
    save_pipeline(tmp_path / "lcm", model.unet, model, model.scheduler_config)
    torch.testing.assert_close(call(LCMGenerator.load(str(tmp_path / "lcm")), guidance_scale=1.0), reference, rtol=0, atol=1e-5)
