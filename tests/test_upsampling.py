"""`upsampling`: nearest 2× then a 3×3 convolution, as one 2×2 convolution of the small input, equals the plain computation;
a model with its upsamplers replaced computes what diffusers' modules compute, with the same parameters."""

import pytest
import torch
import torch.nn.functional as F

from latent_consistency.models import load_lcm
from latent_consistency.pipelines import LCMGenerator
from latent_consistency.upsampling import SubpixelUpsample, phase_kernels, upsample_conv, use_subpixel_upsampling


def plain(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def test_phase_kernels_of_a_one_hot_kernel():
    """A kernel that reads only the tap below-right (row 2, column 2): phase (1, 1) reads it from the input's (i+1, j+1),
    (0, 0) from (i, j), and the phases between from the mixed corners, each a single one in its 2×2 kernel."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 2, 2] = 1.0
    kernels = phase_kernels(weight)[:, 0]
    expected = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    assert torch.equal(kernels, expected)
    # the centre tap is shared: row 1 joins row 2 in phase 0 and row 0 in phase 1
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    kernels = phase_kernels(weight)[:, 0]
    assert torch.equal(kernels[0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # phase (0, 0): rows (i-1, i), taps (W0, W1+W2)
    assert torch.equal(kernels[3], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # phase (1, 1): rows (i, i+1), taps (W0+W1, W2)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 8, 1, 1), (3, 4, 7, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_nearest_then_conv(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(5, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if bias else None
    got = upsample_conv(x, weight, b)
    assert got.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, plain(x, weight, b), rtol=1e-12, atol=1e-12)


def test_upsample_conv_takes_a_channels_last_input():
    torch.manual_seed(5)
    x, weight, bias = torch.randn(2, 4, 5, 6), torch.randn(3, 4, 3, 3), torch.randn(3)
    got = upsample_conv(x.to(memory_format=torch.channels_last), weight, bias)
    torch.testing.assert_close(got, plain(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_upsample_conv_gradients_equal_the_plain_ones():
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    upstream = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    grads = []
    for fn in (upsample_conv, plain):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        (fn(*leaves) * upstream).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_upsample_conv_in_bfloat16_stays_within_its_rounding():
    torch.manual_seed(2)
    x, weight, bias = torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3) / 12, torch.randn(16)
    expected = plain(x, weight, bias)
    got = upsample_conv(x.bfloat16(), weight.bfloat16(), bias.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_odd_output_size_falls_back_to_the_plain_computation():
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(1, 3, 3, 3)
    module = SubpixelUpsample(conv)
    torch.testing.assert_close(module(x, (5, 6)), conv(F.interpolate(x, size=(5, 6), mode="nearest")))
    torch.testing.assert_close(module(x, (6, 6)), conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_s_phase_kernels_are_made_once_and_remade_when_it_changes():
    torch.manual_seed(6)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)
    module, x = SubpixelUpsample(conv), torch.randn(2, 3, 4, 4)
    first = module(x)
    made = module._kernels
    torch.testing.assert_close(module(x), first)
    assert module._kernels is made  # reused, not made again
    with torch.no_grad():
        conv.weight.mul_(2.0)  # an in-place change: a new version of the same storage
    torch.testing.assert_close(module(x), plain(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
    assert module._kernels is not made
    # a weight being trained gets fresh kernels in every call, and its gradient
    conv.requires_grad_(True)
    module(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_replaced_unet_and_vae_compute_what_diffusers_modules_do(tiny_lcm):
    torch.manual_seed(4)
    plain_model, fast_model = load_lcm(str(tiny_lcm)), load_lcm(str(tiny_lcm))
    keys = {name: tuple(p.shape) for name, p in fast_model.unet.state_dict().items()}
    replaced = use_subpixel_upsampling(fast_model.unet) + use_subpixel_upsampling(fast_model.vae)
    assert replaced >= 2  # at least one upsampler in the UNet and one in the VAE decoder
    assert any(isinstance(m, SubpixelUpsample) for m in fast_model.vae.decoder.modules())
    assert {name: tuple(p.shape) for name, p in fast_model.unet.state_dict().items()} == keys  # same parameters, same names
    assert use_subpixel_upsampling(fast_model.unet) == 0  # nothing left to replace
    size = plain_model.unet.config.sample_size
    z = torch.randn(2, 4, size, size)
    t, cond = torch.tensor([999, 499]), torch.randn(2, 77, plain_model.unet.config.cross_attention_dim)
    w = torch.randn(2, plain_model.unet.config.time_cond_proj_dim)
    with torch.no_grad():
        expected = plain_model.unet(z, t, cond, timestep_cond=w).sample
        got = fast_model.unet(z, t, cond, timestep_cond=w).sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_model.vae.decode(z).sample, plain_model.vae.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_generator_samples_with_the_replaced_upsamplers(tiny_lcm):
    """A generator replaces its model's upsamplers when it is made, and its images match the plain modules' images."""
    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    assert any(isinstance(m, SubpixelUpsample) for m in generator.model.vae.modules())
    assert any(isinstance(m, SubpixelUpsample) for m in generator.model.unet.modules())
    fast = generator(["a red star"], generator.timesteps(2), 2.0, [5], 16, 16)
    reference = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    for network in (reference.model.unet, reference.model.vae):  # put diffusers' modules back
        for name, module in list(network.named_modules()):
            if isinstance(module, SubpixelUpsample):
                parent, _, child = name.rpartition(".")
                restored = plain_upsampler(module.conv)
                setattr(network.get_submodule(parent), child, restored)
    assert not any(isinstance(m, SubpixelUpsample) for m in reference.model.vae.modules())
    torch.testing.assert_close(reference(["a red star"], reference.timesteps(2), 2.0, [5], 16, 16), fast, rtol=1e-5, atol=1e-5)


def plain_upsampler(conv: torch.nn.Conv2d):
    from diffusers.models.upsampling import Upsample2D

    module = Upsample2D(conv.in_channels, use_conv=True, out_channels=conv.out_channels)
    module.conv = conv
    return module
