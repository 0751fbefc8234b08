"""`lcm evaluate`'s LCM images are the ones `lcm generate` makes: image i of an evaluation with --seed S is `lcm generate
--seed S+i`'s image of its prompt, its starting noise and its noise between steps (a user finds a bad image in the grid
and makes it again). Earlier, the noise between steps came from a seed of its own (10^6 + S + i), so beyond one step the
two differed, and image i's between-step noise was image i + 10^6's starting noise."""

import pytest
import torch

from latent_consistency.evaluation.compare import SamplerSpec, sample
from latent_consistency.pipelines import LCMGenerator

PROMPTS = ["a red star", "a blue ring", "a green square"]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_an_evaluation_s_lcm_image_is_lcm_generate_s_image_of_its_seed(tiny_lcm, steps):
    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    size = generator.default_size()
    made = generator(PROMPTS, generator.timesteps(steps), 2.0, [7, 8, 9], size, size).float().clamp(-1, 1)
    scored = sample(SamplerSpec("lcm", steps, 2.0), generator.model, None, PROMPTS, seed=7)
    assert scored.shape == made.shape
    assert (scored - made).abs().max() < 1e-5


def test_the_images_of_a_later_part_are_those_of_the_whole_set(tiny_lcm):
    """An evaluation samples in parts (`compare.batch_size` images, or the parts of `EvalSet.parts`): image i's noise is its
    seed's wherever it falls."""
    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    whole = sample(SamplerSpec("lcm", 4, 2.0), generator.model, None, PROMPTS, seed=7)
    later = sample(SamplerSpec("lcm", 4, 2.0), generator.model, None, PROMPTS[1:], seed=8)
    assert (whole[1:] - later).abs().max() < 1e-5
