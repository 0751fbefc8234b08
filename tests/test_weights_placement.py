"""`devices.weights_placement`: a model's (device, dtype) as its own properties give them, asked again only after the
model was moved or cast (diffusers' `.dtype` and `.device` walk every submodule: milliseconds per image at SD size)."""

import pytest
import torch

from latent_consistency.devices import weights_placement
from latent_consistency.errors import UserError


class Counted(torch.nn.Module):
    """A model whose `.device` / `.dtype` count how often they are read, as diffusers' and transformers' models give them."""

    def __init__(self):
        super().__init__()
        self.layer, self.reads = torch.nn.Linear(3, 2), 0

    @property
    def dtype(self):
        self.reads += 1
        return self.layer.weight.dtype

    @property
    def device(self):
        return self.layer.weight.device


def test_the_placement_is_asked_once_until_the_model_is_cast_or_moved():
    model = Counted()
    assert weights_placement(model) == weights_placement(model) == (torch.device("cpu"), torch.float32) and model.reads == 1
    model.to(torch.float64)
    assert weights_placement(model) == (torch.device("cpu"), torch.float64) and model.reads == 2
    model.to(torch.float64)  # the same dtype: the same tensors, nothing to ask again
    assert weights_placement(model)[1] == torch.float64 and model.reads == 2
    model.to(torch.float32).to(torch.float64)
    assert weights_placement(model)[1] == torch.float64 and model.reads == 3


def test_a_generator_whose_model_was_cast_after_it_was_made_refuses_its_next_call(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    generator = LCMGenerator.load(str(tiny_lcm))
    generator(["a red star"], generator.timesteps(2), 2.0, [0])
    generator.model.unet.to(torch.bfloat16)
    with pytest.raises(UserError, match="the model's weights are torch.bfloat16 but the generator's dtype is torch.float32"):
        generator(["a red star"], generator.timesteps(2), 2.0, [0])
    generator.model.unet.to(torch.float32)
    assert generator(["a red star"], generator.timesteps(2), 2.0, [0]).isfinite().all()
