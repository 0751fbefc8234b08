"""What a user of the Python API can pass to `LCMGenerator` / `SolverGenerator` and the sampling helpers: a mistake is a
one-line `UserError` before any work, never a deep torch/diffusers traceback or a silently wrong image."""

import numpy as np
import pytest
import torch

from latent_consistency.errors import UserError
from latent_consistency.pipelines import LCMGenerator, SolverGenerator
from latent_consistency.sampling import check_custom_timesteps, lcm_timesteps

CPU = torch.device("cpu")
PROMPTS = ["a red star"]


@pytest.fixture(scope="module")
def solver(tiny_sd):
    return SolverGenerator.load(str(tiny_sd), CPU, torch.float32, "ddim")


def test_load_defaults_to_float32_on_the_cpu_as_load_lcm_does(lcm, tiny_lcm):
    """was: `LCMGenerator.load(path)` was a TypeError (device and dtype had no defaults, where `load_lcm`'s do)."""
    plain = LCMGenerator.load(str(tiny_lcm))
    assert (plain.device, plain.dtype) == (CPU, torch.float32)
    assert torch.equal(call(plain), call(lcm))


def call(generator, *, steps: int = 1, **changes):
    """A `steps`-step call of `generator` with `changes` to the arguments of a valid one."""
    args = dict(prompts=PROMPTS, seeds=[0], guidance_scale=2.0, height=16, width=16)
    if isinstance(generator, LCMGenerator):
        args["timesteps"] = generator.timesteps(steps)
    else:
        args["steps"] = steps
    args |= changes
    return generator(**args)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(prompts="a red star"), "must be a list of strings"),  # was: 10 images, one per character
    (dict(prompts=[]), "prompts is empty"),  # was: IndexError in diffusers' randn_tensor
    (dict(prompts=[None]), "must be a list of strings"),
    (dict(prompts=PROMPTS * 2, seeds=[0]), "one seed per prompt"),  # was: both images drawn from seed 0's one generator
    (dict(seeds=[0, 1]), "one seed per prompt"),  # was: the second seed ignored
    (dict(seeds=0), "one seed per prompt"),
    (dict(seeds=[1.5]), "seeds must be integers"),  # was: RuntimeError from manual_seed
    (dict(seeds=[True]), "seeds must be integers"),
    (dict(seeds=[-1]), "seeds must be integers"),  # was: the same images as seed 2^64 - 1
    (dict(seeds=[2**64]), "seeds must be integers"),
    (dict(seeds=[torch.Generator().manual_seed(0)]), "got a Generator"),
    (dict(height=13), "multiple of the VAE factor"),  # was: a 12 px high image
    (dict(height=0), "multiple of the VAE factor"),  # was: RuntimeError in a convolution
    (dict(width=-16), "multiple of the VAE factor"),
    (dict(height=16.0), "integer number of pixels"),
    (dict(guidance_scale=float("nan")), "finite number"),  # was: NaN images
    (dict(guidance_scale=float("inf")), "finite number"),
])
@pytest.mark.parametrize("kind", ["lcm", "solver"])
def test_call_arguments_are_checked(request, kind, changes, message):
    generator = request.getfixturevalue(kind)
    with pytest.raises(UserError, match=message):
        call(generator, **changes)


def test_numpy_seeds_and_tuples_work_as_ints_and_lists(lcm):
    reference = call(lcm, prompts=PROMPTS * 2, seeds=[3, 4])
    assert torch.equal(call(lcm, prompts=tuple(PROMPTS * 2), seeds=(np.int64(3), np.int64(4))), reference)


@pytest.mark.parametrize(("timesteps", "message"), [
    (torch.tensor([499, 999]), "strictly decreasing"),  # was: sampled as given
    (torch.tensor([1500]), r"lie in \[0, 999\]"),  # was: IndexError in the schedule
    (torch.tensor([], dtype=torch.long), "must not be empty"),  # was: the starting noise decoded as the image
    (torch.tensor([999.5]), "must be integers"),
])
def test_lcm_call_checks_its_timesteps(lcm, timesteps, message):
    with pytest.raises(UserError, match=message):
        call(lcm, timesteps=timesteps)


def test_lcm_call_takes_timesteps_as_a_list(lcm):
    assert torch.equal(call(lcm, timesteps=[999]), call(lcm))  # was: AttributeError: 'int' object has no attribute 'to'


@pytest.mark.parametrize(("steps", "custom", "message"), [
    (None, None, "must be an integer"),  # was: TypeError '<' not supported
    (2.5, None, "must be an integer"),
    (True, None, "must be an integer"),
    (4, [], "must not be empty"),  # was: the empty list ignored, 4 steps sampled
    (None, [999.7, 499.2], "must be integers"),  # was: silently truncated to 999, 499
])
def test_lcm_timesteps_arguments(lcm, steps, custom, message):
    with pytest.raises(UserError, match=message):
        lcm.timesteps(steps, custom)


def test_custom_timesteps_as_a_tensor(lcm):
    # was: RuntimeError "Boolean value of Tensor with more than one value is ambiguous"
    assert lcm.timesteps(None, torch.tensor([999, 499])).tolist() == [999, 499]
    assert check_custom_timesteps(torch.tensor(999), 1000).tolist() == [999]
    with pytest.raises(UserError, match="must be an integer"):
        lcm_timesteps(2.0)
    with pytest.raises(UserError, match="meta device"):  # was: torch's NotImplementedError from .tolist()
        check_custom_timesteps(torch.tensor([999, 499], device="meta"), 1000)


@pytest.mark.parametrize(("steps", "message"), [(2000, "between 1 and 1000"), (torch.tensor(2), "must be an integer")])
def test_solver_call_checks_steps(solver, steps, message):
    with pytest.raises(UserError, match=message):  # was: diffusers' ValueError, and a TypeError from numpy
        call(solver, steps=steps)


@pytest.mark.parametrize(("image", "message"), [
    (torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), "floating-point tensor"),  # was: sampled as if in [-1, 1]
    (torch.full((1, 3, 16, 16), 255.0), r"values in \[-1, 1\]"),  # was: sampled as if in [-1, 1]
    (torch.full((1, 3, 16, 16), float("nan")), r"values in \[-1, 1\]"),  # was: NaN images
    (np.zeros((1, 3, 16, 16), np.float32), "must be a torch.Tensor"),  # was: AttributeError
])
def test_init_images_are_checked(lcm, image, message):
    with pytest.raises(UserError, match=message):
        call(lcm, timesteps=lcm.timesteps(1, strength=0.5), init_images=image, strength=0.5)


@pytest.mark.parametrize("strength", [float("nan"), 0.0, 1.5])
def test_strength_out_of_range_with_or_without_init_images(lcm, strength):
    image = torch.zeros(1, 3, 16, 16)
    for init_images in (None, image):  # was, without init images: "strength nan applies to img2img"
        with pytest.raises(UserError, match=r"strength must be in \(0, 1\]"):
            call(lcm, init_images=init_images, strength=strength)


def test_init_images_in_range_still_work(lcm):
    image = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).half()
    assert call(lcm, timesteps=lcm.timesteps(1, strength=0.5), init_images=image, strength=0.5).isfinite().all()


def test_negative_prompt_as_a_string(lcm):
    with pytest.raises(UserError, match="negative_prompts must be a list of strings"):  # was: "got 4", one per character
        call(lcm, negative_prompts="blue")


def test_generator_dtype_and_device_must_be_the_models(lcm):
    with pytest.raises(UserError, match="dtype must be a torch.dtype"):  # was: TypeError deep in randn
        LCMGenerator(lcm.model, CPU, "float32")
    with pytest.raises(UserError, match="weights are torch.float32"):  # was: RuntimeError in the first Linear
        LCMGenerator(lcm.model, CPU, torch.bfloat16)
    with pytest.raises(UserError, match="model is on cpu"):  # a GPU generator of a CPU model: a device mismatch in the UNet
        LCMGenerator(lcm.model, torch.device("meta"), torch.float32)
    assert torch.equal(call(LCMGenerator(lcm.model, "cpu", torch.float32)), call(lcm))


def test_a_model_loaded_onto_a_device_this_machine_lacks_is_one_line(tiny_lcm):
    from latent_consistency.models import load_lcm

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(UserError, match="no CUDA GPU is available"):  # was: torch's "Torch not compiled with CUDA enabled"
        load_lcm(str(tiny_lcm), device="cuda")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        load_lcm(str(tiny_lcm), device="gpu")


@pytest.mark.parametrize("timesteps", [0, 1])
def test_a_noise_schedule_of_fewer_than_two_timesteps_is_refused(timesteps):
    from latent_consistency.schedule import make_betas

    with pytest.raises(UserError, match="at least 2 timesteps"):  # was: an empty schedule
        make_betas(timesteps)


def test_fid_and_kid_of_non_finite_images_are_refused():
    from latent_consistency.evaluation.fid import MIN_IMAGES, fid_score, kid_score

    class Features(torch.nn.Module):  # the feature network contract: feature_dim and features(images)
        feature_dim = 3

        def features(self, images):
            return images.mean((2, 3))

    real = torch.rand(MIN_IMAGES, 3, 4, 4) * 2 - 1
    fake = real.flip(0).clone()
    fake[1, 0, 0, 0] = float("nan")
    for score in (fid_score, kid_score):  # was: a NaN score and oneMKL's "Parameter 3 was incorrect" on stderr
        with pytest.raises(UserError, match="generated images hold NaN"):
            score(Features(), real, fake)
