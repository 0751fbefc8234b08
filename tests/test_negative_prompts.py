"""Negative prompts: the guidance formula on the consistency function against an analytic answer, λ = 0 as plain
sampling, `LCMGenerator`'s and `lcm generate`'s interface and error contract, and an LCM-LoRA against diffusers'
`negative_prompt`."""

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.denoisers import ConsistencyModel, NegativePromptGuidance
from latent_consistency.errors import UserError
from latent_consistency.parameterization import boundary_scalings
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.sampling import randn, sample_lcm
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.testing.analytic import GaussianMixtureEps

CPU = torch.device("cpu")


class Counted:
    """A network that records the batch size of every call."""

    def __init__(self, net):
        self.net, self.batches = net, []

    def __call__(self, z, t, cond, timestep_cond=None):
        self.batches.append(len(z))
        return self.net(z, t, cond, timestep_cond)


@pytest.mark.parametrize("t", [999, 499, 259])
def test_formula_against_the_exact_consistency_function_of_two_gaussian_classes(t):
    """Two classes N(μ_k, s²I): the exact x̂0 of class k at z_t is z/α − σ²(z − α·μ_k)/(α·v), v = α²s² + σ², so
    f̃ = c_skip·z + c_out·((1+λ)·x̂0_c − λ·x̂0_neg) is known in closed form; the wrapper gives it with one doubled batch."""
    schedule = NoiseSchedule.from_config({})
    means, std, lam = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64), 0.3, 0.7
    net = Counted(GaussianMixtureEps(means, std, schedule))
    f = ConsistencyModel(net, schedule, "epsilon", time_cond_proj_dim=None)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3, dtype=torch.float64)  # rows 0-2 class 0, rows 3-5 class 1
    negative = cond.flip(1)  # each row's other class
    guided = NegativePromptGuidance(f, negative, lam)(z, torch.tensor(t), cond, 0.0)

    tt = torch.full((6,), t)
    alpha, sigma = (x.to(z)[:, None] for x in schedule.alpha_sigma(tt))
    v = alpha**2 * std**2 + sigma**2

    def x0(k):
        mu = k @ means
        return z / alpha - sigma**2 * (z - alpha * mu) / (alpha * v)

    c_skip, c_out = (x.to(z)[:, None] for x in boundary_scalings(tt))
    expected = c_skip * z + c_out * ((1 + lam) * x0(cond) - lam * x0(negative))
    torch.testing.assert_close(guided, expected, rtol=1e-10, atol=1e-10)
    # the guidance term is λ·c_out·σ²/v·(μ_c − μ_neg), not zero at these timesteps
    assert (guided - f(z, torch.tensor(t), cond, 0.0)).abs().min() > 1e-3 * c_out.min()
    assert net.batches == [12, 6]  # cond and negative in one batch of 2B; then the plain f above
    # one negative embedding for every row is the same as that embedding repeated
    one = NegativePromptGuidance(f, negative[:1], lam)(z, torch.tensor(t), cond, 0.0)
    torch.testing.assert_close(one, NegativePromptGuidance(f, negative[:1].expand(6, -1), lam)(z, torch.tensor(t), cond, 0.0))


def test_scale_zero_and_unguided_timesteps_are_the_plain_model_exactly():
    schedule = NoiseSchedule.from_config({})
    net = Counted(GaussianMixtureEps(torch.tensor([[1.0, 0.5], [-1.0, -0.5]]), 0.3, schedule))
    f = ConsistencyModel(net, schedule, "epsilon", time_cond_proj_dim=None)
    z, cond = torch.randn(4, 2, dtype=torch.float64), torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    plain = f(z, torch.tensor(759), cond, 0.0)
    assert torch.equal(NegativePromptGuidance(f, cond.flip(1), 0.0)(z, torch.tensor(759), cond, 0.0), plain)
    only_first = NegativePromptGuidance(f, cond.flip(1), 1.0, timesteps=torch.tensor([999]))
    assert torch.equal(only_first(z, torch.tensor(759), cond, 0.0), plain)
    assert not torch.equal(only_first(z, torch.tensor(999), cond, 0.0), f(z, torch.tensor(999), cond, 0.0))


def test_generator_negative_prompts(tiny_lcm):
    generator = LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)
    prompts, seeds, timesteps = ["a red star", "a blue ring"], [3, 4], generator.timesteps(2)

    def images(**kwargs):
        return generator(prompts, timesteps, 8.0, seeds, 16, 16, **kwargs)

    plain = images()
    assert torch.equal(images(negative_prompts=["a red circle"], negative_scale=0.0), plain)
    guided = images(negative_prompts=["a red circle"])
    assert (guided - plain).abs().max() > 1e-3
    # the default λ is DEFAULT_NEGATIVE_SCALE; one negative for all is that negative per prompt
    torch.testing.assert_close(images(negative_prompts=["a red circle"] * 2, negative_scale=0.25), guided, rtol=0, atol=1e-5)
    per_prompt = images(negative_prompts=["a red circle", "a blue star"], negative_scale=0.25)
    torch.testing.assert_close(per_prompt[0], guided[0], rtol=0, atol=1e-5)
    assert (per_prompt[1] - guided[1]).abs().max() > 1e-3
    for bad, message in [(dict(negative_scale=-0.5), "finite number >= 0"), (dict(negative_scale=float("nan")), "finite number >= 0"),
                         (dict(negative_scale=0.5, negative_prompts=None), "applies to a negative prompt"),
                         (dict(negative_prompts=["a", "b", "c"]), "one negative prompt for all prompts or one per prompt")]:
        with pytest.raises(UserError, match=message):
            images(**({"negative_prompts": ["a"]} | bad))


def test_lcm_lora_negative_prompt_equals_diffusers_negative_prompt(tiny_sd, tmp_path):
    """An LCM-LoRA with g > 1 puts the negative prompt where diffusers does, in place of the empty prompt of CFG. And the
    LCM's formula on the unguided LoRA, f + λ·(f − f_neg), is diffusers' CFG at g = 1 + λ with that negative prompt
    (f is affine in the network output), a known answer for `NegativePromptGuidance` on a real UNet."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    generator = LCMGenerator.load(str(tiny_sd), CPU, torch.float32, lora=str(lora))
    model = generator.model
    prompts, negatives, steps, g = ["a red star", "a ring"], ["a blue star", "a red ring"], 3, 1.5

    def reference(guidance_scale):
        generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
        latents = randn((2, 4, 8, 8), generators, "cpu", torch.float32)
        return pipe(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                    output_type="latent", generator=generators).images

    def ours(f):
        generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
        latents = randn((2, 4, 8, 8), generators, "cpu", torch.float32)
        cond = model.prompts.encode(prompts)
        return sample_lcm(f, latents, generator.timesteps(steps), cond, 0.0, model.schedule, generators)

    negative = model.prompts.encode(negatives)
    # latents about 50 in size, where float32 rounds by 4e-6: the LoRA fused into the UNet's weights (`LCMGenerator.load`) rounds
    # otherwise than diffusers' unfused layers (up to 1.7e-5 here; 1.35e-5 with both unfused)
    close = dict(rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(ours(generator.consistency_function(g, 2, negatives)), reference(g), **close)
    torch.testing.assert_close(ours(NegativePromptGuidance(model.consistency_model(1.0), negative, g - 1)), reference(g), **close)
    # the negative prompt matters: against the empty prompt the same guidance gives something else
    assert (ours(model.consistency_model(g)) - reference(g)).abs().max() > 1e-4
    with pytest.raises(UserError, match="needs a guidance scale above 1"):
        generator.consistency_function(1.0, 2, negatives)
    with pytest.raises(UserError, match="the negative scale applies to LCMs"):
        generator.consistency_function(g, 2, negatives, 0.5)


def test_cli_negative_prompt(tiny_lcm, tmp_path):
    common = ["generate", "a red star", "a blue ring", "--model", str(tiny_lcm), "--steps", "2", "--seed", "1", "--height", "16", "--width", "16"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "zero"), "--negative-prompt", "a red circle", "--negative-scale", "0"]) == 0
    assert main(common + ["--out", str(tmp_path / "neg"), "--negative-prompt", "a red circle", "--negative-scale", "1.5"]) == 0
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert len(names) == 2

    def pixels(folder, name):
        return np.asarray(Image.open(tmp_path / folder / name), dtype=np.int16)

    for name in names:
        assert np.array_equal(pixels("zero", name), pixels("plain", name))
        assert np.abs(pixels("neg", name) - pixels("plain", name)).max() > 2


@pytest.mark.parametrize("argv,message", [
    (["--negative-prompt", "a circle", "--negative-scale", "-1"], "--negative-scale -1 is below 0"),
    (["--negative-prompt", "a circle", "--negative-scale", "nan"], "is not a finite number"),
    (["--negative-prompt", "a circle", "--negative-scale", "inf"], "is not a finite number"),
    (["--negative-scale", "0.5"], "give --negative-prompt"),
])
def test_cli_bad_negative_values_one_line_exit_2(tiny_lcm, tmp_path, run_error, argv, message):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--out", str(out)] + argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_cli_lora_negative_prompt_needs_guidance_above_one(tiny_sd, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    out = tmp_path / "out"
    argv = ["generate", "a red star", "--model", str(tiny_sd), "--lora", str(lora), "--negative-prompt", "a ring", "--out", str(out)]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and "needs a guidance scale above 1" in err, err
    code, err = run_error(argv + ["--guidance-scale", "1.5", "--negative-scale", "0.5"])
    assert code == 2 and len(err.splitlines()) == 1 and "the negative scale applies to LCMs" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_help_documents_the_negative_prompt_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "--negative-prompt" in text and "--negative-scale" in text and "default 0.25" in text
