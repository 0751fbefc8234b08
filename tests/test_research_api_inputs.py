"""Arguments a researcher naturally passes to the library's pieces (schedule, denoisers, solvers, samplers, losses,
evaluation) when building an experiment in Python rather than through the CLI: each gives the right answer or a
clear error, never a silently wrong result, a deep traceback or a hang. On the analytic toys or tiny tensors."""

import copy
import signal

import pytest
import torch

from latent_consistency.denoisers import ConsistencyModel, NegativePromptGuidance, UNetNetwork
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.losses import GuidancePairLCDLoss, LCDLoss
from latent_consistency.sampling import lcm_timesteps, sample_lcm, sample_tcd, sample_teacher
from latent_consistency.schedule import NoiseSchedule
from latent_consistency.solvers import get_solver, guided_jump
from latent_consistency.testing.toy2d import ToyStudent, class_weights, prior_weights, toy_teacher

SD = NoiseSchedule.from_config({})
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    student = ConsistencyModel(ToyStudent(), SD, "v_prediction", 32)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    return toy_teacher(SD), student, z, class_weights(torch.tensor([0, 1, 0]), 2), prior_weights(3, 2)


@pytest.mark.parametrize("t", [-1, 1000])
def test_an_integer_timestep_outside_the_schedule_is_refused(t):
    # was: t = -1 read as T-1 by Python's negative indexing (α = 0.068, pure noise, silently; e.g. t_n = t_{n+k} - k
    # of the first grid point computed by hand), t = T an IndexError; the float path clamps instead
    with pytest.raises(UserError, match=r"must lie in \[0, 999\]"):
        SD.alpha_sigma(torch.tensor([t]))
    with pytest.raises(UserError, match=r"must lie in \[0, 999\]"):
        SD.add_noise(torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([t]))


@pytest.mark.parametrize("name", ["ddim", "dpm", "dpm++"])
def test_a_one_element_timestep_serves_every_row(toy, name):
    teacher, _, z, cond, uncond = toy
    # was: RuntimeError "The size of tensor a (6) must match the size of tensor b (2)": a [1] t was kept as one row
    ref = guided_jump(get_solver(name), teacher, z, torch.tensor(500), torch.tensor(300), cond, uncond, 2.0)
    out = guided_jump(get_solver(name), teacher, z, torch.tensor([500]), torch.tensor([300]), cond, uncond, 2.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_one_row_uncond_serves_every_row_of_the_teacher_and_the_losses(toy):
    teacher, student, z, cond, uncond = toy
    one = uncond[:1]  # ∅ encoded once ([1, ...], what a prompt encoder gives for "")
    # was: RuntimeError "The size of tensor a (4) must match the size of tensor b (6)" in the teacher's batch
    torch.testing.assert_close(teacher.guided_output(z, 500, cond, one, 2.0), teacher.guided_output(z, 500, cond, uncond, 2.0))
    for name in ("ddim", "dpm++"):
        for increments in (False, True):
            torch.testing.assert_close(guided_jump(get_solver(name), teacher, z, 500, 300, cond, one, 2.0, increments),
                                       guided_jump(get_solver(name), teacher, z, 500, 300, cond, uncond, 2.0, increments))
    torch.testing.assert_close(sample_teacher(teacher, "dpm++", z, cond, one, 2.0, 3, SCHEDULER_CONFIG),
                               sample_teacher(teacher, "dpm++", z, cond, uncond, 2.0, 3, SCHEDULER_CONFIG))
    target = copy.deepcopy(student)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    for loss in (LCDLoss(schedule=SD, teacher=teacher, solver=get_solver("dpm++"), guidance_scale_range=(1.0, 4.0)),
                 GuidancePairLCDLoss(schedule=SD, teacher=teacher, solver=get_solver("ddim"), guidance_scale_range=(1.0, 4.0),
                                     guidance_pair_weight=1.0)):
        with torch.no_grad():
            torch.testing.assert_close(loss(student, target, x0, cond, one, torch.Generator().manual_seed(0)),
                                       loss(student, target, x0, cond, uncond, torch.Generator().manual_seed(0)))


def tiny_unet_student():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=32,
        cross_attention_dim=32, attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), time_cond_proj_dim=32).eval()
    return ConsistencyModel(UNetNetwork(unet), SD, "epsilon", 32)


def test_one_prompt_for_a_batch_of_noise_with_a_unet_student():
    f = tiny_unet_student()
    noise, cond = torch.randn(3, 4, 8, 8), torch.randn(1, 5, 32)  # cond: one prompt, as `model.prompts.encode([p])` gives
    # was: RuntimeError "The size of tensor a (48) must match the size of tensor b (16)" inside the UNet's attention
    torch.testing.assert_close(sample_lcm(f, noise, lcm_timesteps(2), cond, 1.0, SD, torch.Generator().manual_seed(0)),
                               sample_lcm(f, noise, lcm_timesteps(2), cond.expand(3, -1, -1), 1.0, SD, torch.Generator().manual_seed(0)))


def test_a_negative_prompt_with_one_prompt_for_a_batch_of_noise():
    f = tiny_unet_student()
    noise, cond, negative = torch.randn(3, 4, 8, 8), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    guided = NegativePromptGuidance(f, negative, 0.5)
    # was: RuntimeError "Sizes of tensors must match": c's one row and the negative's three doubled into 4 rows, not 6
    with torch.no_grad():
        torch.testing.assert_close(guided(noise, torch.tensor(999), cond, 1.0), guided(noise, torch.tensor(999), cond.expand(3, -1, -1), 1.0))


@pytest.mark.parametrize("cond", [torch.randn(5, 32), torch.randn(2, 5, 32), torch.randn(3, 5, 32, 1)])
def test_a_condition_of_the_wrong_shape_is_refused_before_the_unet(cond):
    f = tiny_unet_student()
    # was (2-D c, one prompt's tokens without the batch dimension): an error deep in diffusers' attention
    with pytest.raises(ValueError, match=r"token embeddings \[B, L, D\] with B = 3"):
        f(torch.randn(3, 4, 8, 8), torch.tensor(999), cond, 1.0)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_sample_lcm_and_tcd_take_timesteps_as_a_list_or_a_0d_tensor(toy, sampler):
    _, student, z, cond, _ = toy

    def run(timesteps):
        if sampler == "lcm":
            return sample_lcm(student, z, timesteps, cond, 1.0, SD, torch.Generator().manual_seed(0))
        return sample_tcd(student, z, timesteps, cond, 1.0, SD, 0.3, torch.Generator().manual_seed(0))

    # was (lcm): AttributeError "'int' object has no attribute 'to'"; TypeError "iteration over a 0-d tensor"
    torch.testing.assert_close(run([999, 499]), run(torch.tensor([999, 499])), rtol=0, atol=0)
    torch.testing.assert_close(run(torch.tensor(999)), run(torch.tensor([999])), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
@pytest.mark.parametrize(("timesteps", "message"), [
    ([499, 999], "strictly decreasing"),  # was: sampled as given, the last x̂0 from t = 999 (noise-level output), silently
    ([1000], r"lie in \[0, 999\]"),  # was (lcm): IndexError deep in the schedule
    ([999.7, 499.2], "must be integers"),  # was (tcd): silently truncated to 999, 499
])
def test_sample_lcm_and_tcd_check_their_timesteps(toy, sampler, timesteps, message):
    _, student, z, cond, _ = toy
    with pytest.raises(UserError, match=message):
        if sampler == "lcm":
            sample_lcm(student, z, torch.tensor(timesteps), cond, 1.0, SD)
        else:
            sample_tcd(student, z, torch.tensor(timesteps), cond, 1.0, SD, 0.3)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_sample_teacher_steps_must_be_an_integer(toy, sampler):
    teacher, _, z, cond, uncond = toy
    # was: IndexError "tensors used as indices must be long" (ddim), TypeError "'float' object cannot be interpreted" (dpm)
    with pytest.raises(UserError, match="must be an integer"):
        sample_teacher(teacher, sampler, z, cond, uncond, 2.0, 4.0, SCHEDULER_CONFIG)


def test_the_teacher_consistency_function_at_a_real_timestep_returns(toy):
    teacher, _, z, cond, uncond = toy
    f = TeacherConsistencyFunction(teacher, get_solver("ddim"), 20, uncond[:1])

    def timeout(*_):
        raise TimeoutError("TeacherConsistencyFunction did not return")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(3)
    try:
        # was: an endless loop, `int(now.max())` = 998 never equals the rows' t = 998.5 (ConsistencyModel takes real t);
        # the teacher's chain runs between integer timesteps, so a real t is refused and a whole one runs
        with pytest.raises(UserError, match="integer timesteps"):
            f(z, torch.tensor(998.5), cond, 1.0)
        out = f(z, torch.tensor(999.0), cond, 1.0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert out.isfinite().all() and torch.equal(out, f(z, torch.tensor(999), cond, 1.0))
