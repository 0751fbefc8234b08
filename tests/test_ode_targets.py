"""`lcm distill --method ode`: the bank of the teacher's exact ODE solutions and the regression onto it.

Known answers on Gaussian data, where the guided teacher's ODE solution is closed-form (`gaussian_flow`): cond
N(μ_c, s²) and uncond N(μ_u, s²) share a variance, so the guided ε at ω is that of N(μ_c + ω(μ_c − μ_u), s²).
"""

import json

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.denoisers import GuidedTeacher
from latent_consistency.errors import UserError
from latent_consistency.evaluation.ode_error import TeacherConsistencyFunction
from latent_consistency.losses import ODERegressionLoss
from latent_consistency.schedule import NoiseSchedule, skipping_grid
from latent_consistency.solvers import get_solver
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow
from latent_consistency.training.ode_targets import FILE, ODETargets, build_ode_targets

MEANS, STD = torch.tensor([[0.5, -0.5], [-0.3, 0.2]]), 0.4
SCHEDULE = NoiseSchedule.from_config({})


def guided_flow(strength: float = 1.0):
    """The exact consistency function of the guided Gaussian teacher, its ω effect scaled by `strength` (1: exact)."""
    def f(z, t, cond, omega):
        omega = torch.as_tensor(omega, dtype=z.dtype).reshape(-1, 1)
        mean = MEANS[0] + strength * omega * (MEANS[0] - MEANS[1])
        return gaussian_flow(z, t, torch.zeros_like(t), mean, STD, SCHEDULE)
    return f


def gaussian_batches(b: int):
    net = GaussianMixtureEps(MEANS, STD, SCHEDULE)
    cond = torch.tensor([[1.0, 0.0]]).expand(b, 2)
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"latents": net.sample(b, cond, generator).float(), "cond": cond}


def gaussian_bank(rows=96, guidance=(1.0, 4.0), seed=3) -> ODETargets:
    teacher = GuidedTeacher(GaussianMixtureEps(MEANS, STD, SCHEDULE), SCHEDULE, "epsilon")
    exact = TeacherConsistencyFunction(teacher, get_solver("dpm++"), 20, torch.tensor([[0.0, 1.0]]))
    return build_ode_targets(exact, gaussian_batches(40), rows, guidance, torch.Generator().manual_seed(seed))


def test_the_bank_holds_the_guided_teachers_exact_solutions_at_two_omega_per_row():
    bank = gaussian_bank()
    assert len(bank) == 96 and bank.z.shape == (96, 2) and bank.solution.shape == (96, 2, 2)
    assert set(bank.t.tolist()) <= set(skipping_grid(1000, 20).tolist()) and len(set(bank.t.tolist())) > 20
    assert ((bank.omega >= 0) & (bank.omega <= 3)).all() and (bank.omega[:, 0] != bank.omega[:, 1]).all()
    for i in range(2):
        exact = guided_flow()(bank.z, bank.t, bank.cond, bank.omega[:, i])
        assert (bank.solution[:, i] - exact).abs().max() < 0.05 * (exact - bank.z).abs().max()
    # The teacher's guidance effect is what the pair of columns shows
    delta = bank.solution[:, 0] - bank.solution[:, 1]
    assert (delta.norm(dim=1) > 0).all()
    # A pure function of the seed; the chunking of the data into micro-batches does not enter
    again = gaussian_bank()
    assert all(torch.equal(getattr(bank, k), getattr(again, k)) for k in ("z", "t", "omega"))
    assert torch.allclose(bank.solution, again.solution, atol=1e-6)


def test_the_bank_saves_atomically_and_loads_back(tmp_path):
    bank = gaussian_bank(rows=10)
    bank.save(tmp_path / FILE)
    assert [p.name for p in tmp_path.iterdir()] == [FILE]
    loaded = ODETargets.load(tmp_path / FILE)
    assert all(torch.equal(getattr(bank, k), getattr(loaded, k)) for k in ("z", "t", "cond", "omega", "solution"))
    with pytest.raises(UserError, match="at least 1"):
        gaussian_bank(rows=0)


def test_regression_onto_the_bank_is_zero_for_the_exact_consistency_function_and_fits_the_guidance_effect():
    """With the closed form in the bank, the exact f scores 0; an f whose ω effect is s of the teacher's has
    f(ω) − f(ω') = s·Δψ, so the λ_Δ term adds exactly (1 − s)²·mean(Δψ²) per row, and an f that ignores ω pays all of it."""
    bank = gaussian_bank()
    for i in range(2):
        bank.solution[:, i] = guided_flow()(bank.z, bank.t, bank.cond, bank.omega[:, i])
    latents = torch.zeros(64, 2)  # only its length counts: 32 rows, each at its two ω

    def loss(f, weight, seed=0):
        return ODERegressionLoss(bank=bank, distance="l2", guidance_pair_weight=weight)(f, None, latents,
                                                                                      generator=torch.Generator().manual_seed(seed))

    assert loss(guided_flow(), 10.0).shape == (32,) and loss(guided_flow(), 10.0).max() < 1e-10
    rows = torch.randint(0, len(bank), (32,), generator=torch.Generator().manual_seed(0))  # the draw the loss makes
    delta_sq = ((bank.solution[rows, 0] - bank.solution[rows, 1]) ** 2).mean(1)
    for s in (0.0, 0.5):  # a difference of float32 losses near 1: good to about 1e-7 (a row whose two ω nearly agree)
        assert torch.allclose(loss(guided_flow(s), 1.0) - loss(guided_flow(s), 0.0), (1 - s) ** 2 * delta_sq, rtol=1e-4, atol=1e-6)
    assert loss(guided_flow(0.0), 0.0).mean() > loss(guided_flow(0.5), 0.0).mean() > loss(guided_flow(0.9), 0.0).mean()
    assert torch.equal(loss(guided_flow(0.5), 1.0, seed=7), loss(guided_flow(0.5), 1.0, seed=7))


def test_the_staircase_solve_of_mixed_timesteps_equals_solving_each_alone():
    teacher = GuidedTeacher(GaussianMixtureEps(MEANS, STD, SCHEDULE), SCHEDULE, "epsilon")
    exact = TeacherConsistencyFunction(teacher, get_solver("ddim"), 20, torch.tensor([[0.0, 1.0]]))
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t, cond, omega = torch.tensor([999, 499, 510, 19, 0, 499]), torch.tensor([[1.0, 0.0]]).expand(6, 2), torch.linspace(0, 3, 6)
    together = exact(z, t, cond, omega)
    alone = torch.cat([exact(z[i:i + 1], t[i:i + 1], cond[i:i + 1], omega[i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-6) and torch.equal(together[4], z[4])


def ode_args(tiny_sd, data, out, *extra):
    return ["distill", "--preset", "tiny", "--method", "ode", "--ode-targets", "6", "--teacher", str(tiny_sd), "--data", str(data),
            "--out", str(out), "--guidance-scale-min", "1", "--guidance-scale-max", "4", *extra]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 12)


def test_lcm_distill_method_ode_builds_the_bank_once_and_exports_an_lcm(tiny_sd, image_folder, tmp_path, monkeypatch, capsys):
    from diffusers import LatentConsistencyModelPipeline

    from latent_consistency.training import ode_targets

    built = []
    original = ode_targets.ODETargets.save
    monkeypatch.setattr(ode_targets.ODETargets, "save", lambda self, path: (built.append(len(self)), original(self, path)))
    out = tmp_path / "run"
    assert main(ode_args(tiny_sd, image_folder, out, "--guidance-pair-weight", "10")) == 0
    assert built == [6] and (out / FILE).is_file()
    bank = ODETargets.load(out / FILE)
    assert bank.solution.shape[:2] == (6, 2) and bank.cond.shape[0] == 6
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "ode" and config["ode_targets"] == 6
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm")
    image = pipe("a red square", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape[0] == 1 and torch.isfinite(torch.from_numpy(image)).all()
    assert "ω response of the student" in capsys.readouterr().out
    # A resumed run (more steps) reads the bank back instead of solving again
    assert main(ode_args(tiny_sd, image_folder, out, "--guidance-pair-weight", "10", "--steps", "6", "--resume")) == 0
    assert built == [6]


@pytest.mark.parametrize("case", ["lora", "ict", "eval fraction", "increments", "pair steps", "no rows"])
def test_method_ode_refuses_what_it_has_no_use_for(tiny_sd, image_folder, tmp_path, capsys, case):
    extra, message = {
        "lora": (["--adapter", "lora"], "--adapter full"),
        "ict": (["--loss-weighting", "ict"], "--loss-weighting uniform"),
        "eval fraction": (["--eval-fraction", "0.2"], "no --eval-data or --eval-fraction"),
        "increments": (["--guide-increments"], "no --guide-increments"),
        "pair steps": (["--guidance-pair-weight", "1", "--guidance-pair-steps", "3"], "no --guidance-pair-steps"),
        "no rows": (["--ode-targets", "0"], "--ode-targets must be at least 1"),
    }[case]
    assert main(ode_args(tiny_sd, image_folder, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_world_ode_preset_is_a_valid_ode_run(tiny_sd, image_folder, tmp_path, capsys):
    argv = ["distill", "--preset", "world-ode", "--teacher", str(tiny_sd), "--data", str(image_folder), "--out", str(tmp_path / "r"),
            "--dry-run"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "ode" and printed["loss_weighting"] == "uniform" and printed["guidance_scale_max"] == 4.0


def test_the_world_guided_preset_continues_a_student(tiny_sd, tiny_lcm, image_folder, tmp_path, capsys):
    """The second stage of the world's guided recipe: LCD with the pair loss from a given student, the network slow and the
    ω projection fast (5e-3)."""
    argv = ["distill", "--preset", "world-guided", "--teacher", str(tiny_sd), "--data", str(image_folder), "--out", str(tmp_path / "r"),
            "--student-init", str(tiny_lcm), "--dry-run"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "lcd" and printed["student_init"] == str(tiny_lcm) and printed["guidance_pair_weight"] == 10.0
    assert printed["lr"] * printed["omega_lr_scale"] == pytest.approx(5e-3, rel=1e-3) and printed["guidance_scale_max"] == 4.0


def test_the_world_guided_preset_without_a_student_is_refused(tiny_sd, image_folder, tmp_path, capsys):
    argv = ["distill", "--preset", "world-guided", "--teacher", str(tiny_sd), "--data", str(image_folder), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset world-guided continues a `--preset world-ode` run" in err, err
    assert not (tmp_path / "r").exists()
