"""Stage one of Guided-Distill (Meng et al. 2023): the teacher's classifier-free guidance learned as an ω input.

Known answer on the 2-D Gaussian mixture (the exact guided teacher), with a control that fails; the command end to
end on a tiny teacher: export, sampling at one network evaluation per step, and an LCM distilled from it."""

import json
import shutil

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.models import PROGRESSIVE_FILE, PROGRESSIVE_STEPS
from latent_consistency.sampling import sample_teacher
from latent_consistency.testing.toy2d import (
    FlippedGuidanceTeacher,
    _data_scale,
    class_weights,
    guidance_distill_toy2d,
    prior_weights,
    toy_teacher,
)


@pytest.fixture(scope="module")
def toy():
    teacher = toy_teacher()
    return teacher, guidance_distill_toy2d(steps=800, teacher=teacher)


def test_stage_one_reproduces_the_guided_output_and_its_samples(toy):
    """Relative MSE of the one-evaluation ω output against (1+ω)ε_c − ωε_u below 0.2 % at t = 900 and 500 (the toy's ε
    is sharpest near t = 0: below 10 % at t = 20); its 25-step DDIM samples within 8 % of the data scale of the guided
    teacher's from the same noise, where a model distilled from the sign-flipped teacher is more than 20 % away."""
    teacher, distilled = toy
    g = torch.Generator().manual_seed(5)
    n = 2000
    cond, uncond = class_weights(torch.randint(0, 2, (n,), generator=g), 2), prior_weights(n, 2)
    for t, tolerance in ((900, 2e-3), (500, 2e-3), (20, 0.1)):
        tt = torch.full((n,), t)
        z = teacher.schedule.add_noise(teacher.net.sample(n, cond, g).float(), torch.randn(n, 2, generator=g), tt)
        omega = torch.rand(n, generator=g) * 3
        exact = teacher.guided_output(z, tt, cond, uncond, omega)
        assert float(((distilled.guided_output(z, tt, cond, uncond, omega) - exact) ** 2).mean() / (exact**2).mean()) < tolerance, t
    flipped = guidance_distill_toy2d(steps=800, teacher=FlippedGuidanceTeacher(teacher.net, teacher.schedule, "epsilon"))
    z_T = torch.randn(n, 2, generator=g)
    for guidance_scale in (1.5, 3.5):
        exact = sample_teacher(teacher, "ddim", z_T, cond, uncond, guidance_scale, 25, {})
        ours, control = (sample_teacher(m, "ddim", z_T, cond, uncond, guidance_scale, 25, {}) for m in (distilled, flipped))
        scale = _data_scale(teacher)
        assert float((ours - exact).norm(dim=1).mean()) < 0.08 * scale < 0.2 * scale < float((control - exact).norm(dim=1).mean())


SD_TRAILING = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")


def test_a_progressive_round_does_in_one_step_what_its_teacher_does_in_two():
    """Stage two on the toy: the round-1 student's 1-step DDIM (diffusers' DDIM, trailing spacing) lands within 5 % of
    the data scale of its stage-one teacher's 2-step DDIM from the same noise; the teacher's own 1 step is far off,
    and so is a student of the sign-flipped teacher."""
    from latent_consistency.testing.toy2d import progressive_distill_toy2d

    teacher = toy_teacher()
    stage_one = guidance_distill_toy2d(steps=800, prediction_type="v_prediction", teacher=teacher)
    student = progressive_distill_toy2d(stage_one, student_steps=1)
    flipped = guidance_distill_toy2d(steps=800, prediction_type="v_prediction",
                                     teacher=FlippedGuidanceTeacher(teacher.net, teacher.schedule, "epsilon"))
    control = progressive_distill_toy2d(flipped, student_steps=1)
    n, g = 2000, torch.Generator().manual_seed(3)
    cond, uncond = class_weights(torch.randint(0, 2, (n,), generator=g), 2), prior_weights(n, 2)
    z_T = torch.randn(n, 2, generator=g)
    scale = _data_scale(teacher)
    for guidance_scale in (1.5, 3.5):
        two = sample_teacher(stage_one, "ddim", z_T, cond, uncond, guidance_scale, 2, SD_TRAILING)

        def distance(model, steps, guidance_scale=guidance_scale, two=two):
            return float((sample_teacher(model, "ddim", z_T, cond, uncond, guidance_scale, steps, SD_TRAILING) - two).norm(dim=1).mean()) / scale

        assert distance(student, 1) < 0.05 < 0.2 < min(distance(stage_one, 1), distance(control, 1)), guidance_scale


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 16)


@pytest.fixture(scope="module")
def guided(tiny_sd, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gd") / "run"
    assert main(["distill", "--method", "guidance", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder),
                 "--out", str(out), "--guidance-scale-min", "1", "--guidance-scale-max", "4"]) == 0
    return out / "guided"


def test_the_guidance_distilled_model_is_a_diffusion_model_with_an_omega_input(guided, tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    assert json.loads((guided / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    assert UNet2DConditionModel.from_pretrained(guided, subfolder="unet").config.time_cond_proj_dim is not None
    assert StableDiffusionPipeline.from_pretrained(guided, safety_checker=None) is not None
    # `lcm generate` samples it with an ODE solver, one network evaluation (not two) per step
    rows = []
    real_forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, z, *a, **k: rows.append(z.shape[0]) or real_forward(self, z, *a, **k))
    assert main(["generate", "a red star", "a ring", "--model", str(guided), "--sampler", "ddim", "--steps", "3", "--guidance-scale", "3",
                 "--out", str(tmp_path / "images")]) == 0
    assert rows == [2, 2, 2] and len(list((tmp_path / "images").glob("*.png"))) == 2
    assert main(["generate", "a", "--model", str(guided), "--out", str(tmp_path / "x")]) == 2
    assert "guidance-distilled diffusion model" in capsys.readouterr().err


def test_an_lcm_distilled_from_the_guidance_distilled_teacher_or_started_from_it(guided, tiny_sd, image_folder, tmp_path):
    """Its ω input stands for the teacher's guidance in LCD's jumps (one evaluation each), and the student starts as it;
    or the CFG teacher's LCD student starts from it (--student-init)."""
    for name, args in (("from-guided", ["--teacher", str(guided)]), ("init", ["--teacher", str(tiny_sd), "--student-init", str(guided)])):
        out = tmp_path / name
        assert main(["distill", "--preset", "tiny", *args, "--data", str(image_folder), "--out", str(out)]) == 0
        assert (out / "lcm" / "model_index.json").is_file()


def test_a_student_init_run_resumes_without_the_folder_it_started_from(guided, tiny_sd, image_folder, tmp_path):
    """A checkpoint records the student's architecture: the --student-init folder may be gone when the run resumes (a
    stage-one run cleared away), and the resumed run ends where an uninterrupted one does."""
    from safetensors.torch import load_file

    start = shutil.copytree(guided, tmp_path / "stage-one")
    args = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--student-init", str(start), "--data", str(image_folder),
            "--checkpoint-every", "1"]
    assert main([*args, "--out", str(tmp_path / "whole"), "--steps", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "stopped"), "--steps", "2"]) == 0
    shutil.rmtree(start)
    assert main([*args, "--out", str(tmp_path / "stopped"), "--steps", "3", "--resume"]) == 0
    whole, resumed = (load_file(tmp_path / run / "lcm" / "unet" / "diffusion_pytorch_model.safetensors") for run in ("whole", "stopped"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_progressive_round_on_the_command_line_and_in_the_table(guided, tiny_lcm, image_folder, tmp_path):
    """A round from the stage-one model: it samples with diffusers' DDIM on its own grid (trailing spacing), records its
    step count, and `lcm evaluate --guided-distill` puts it (and the stage-one model at every step count) in Table 1."""
    from latent_consistency.models import load_diffusion_model

    out = tmp_path / "round"
    assert main(["distill", "--method", "progressive", "--student-steps", "2", "--preset", "tiny", "--teacher", str(guided),
                 "--data", str(image_folder), "--out", str(out), "--guidance-scale-min", "1", "--guidance-scale-max", "4"]) == 0
    model = load_diffusion_model(str(out / "guided"))
    assert model.distilled_steps == 2 and model.scheduler_config["timestep_spacing"] == "trailing"
    assert main(["generate", "a red star", "--model", str(out / "guided"), "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "i")]) == 0
    table = tmp_path / "table"
    evaluate = ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--out", str(table), "--steps", "1", "--samples", "4",
                "--inception", str(inception_stand_in(tmp_path)), "--device", "cpu"]
    assert main(evaluate + ["--guided-distill", str(out / "guided")]) == 0
    rows = json.loads((table / "results.json").read_text())["rows"]
    assert set(rows) == {"lcm|1|8", "guided-distill|2|8"} and rows["guided-distill|2|8"]["network_evaluations"] == 2
    header = next(line for line in (table / "report.md").read_text().splitlines() if line.startswith("| method"))
    assert "FID 1 | FID 2" in header  # the round's step count is a column although --steps did not ask for it
    assert main(evaluate + ["--guided-distill", str(out / "guided"), str(guided), str(out / "guided")]) == 2
    assert main(evaluate + ["--guided-distill", str(guided), "--guidance-scale", "0.5"]) == 2


def inception_stand_in(folder):
    """A TorchScript network with the FID Inception file's interface, as a cheap metric for the table."""

    class StandIn(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)

    path = folder / "stand-in.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


@pytest.mark.parametrize("case", ["lora", "guided teacher", "increments", "init without omega", "progressive without omega",
                                  "progressive without steps", "solver", "weighting", "not halving", "steps not dividing T",
                                  "progressive prediction", "init prediction"])
def test_guidance_distillation_bad_input(case, guided, tiny_sd, image_folder, tmp_path, run_error):
    base = ["distill", "--preset", "tiny", "--data", str(image_folder), "--out", str(tmp_path / "out")]
    four_steps = tmp_path / "four-steps"  # stands for a model progressively distilled to 4 DDIM steps
    shutil.copytree(guided, four_steps)
    (four_steps / PROGRESSIVE_FILE).write_text(json.dumps({PROGRESSIVE_STEPS: 4}))
    progressive = ["--method", "progressive", "--student-steps"]
    cases = {
        "lora": (base + ["--teacher", str(tiny_sd), "--method", "guidance", "--adapter", "lora"], "--adapter lora"),
        "guided teacher": (base + ["--teacher", str(guided), "--method", "guidance"], "has learned its guidance already"),
        "increments": (base + ["--teacher", str(guided), "--guide-increments"], "no unguided increments"),
        "init without omega": (base + ["--teacher", str(tiny_sd), "--student-init", str(tiny_sd)], "has no ω input"),
        "progressive without omega": (base + ["--teacher", str(tiny_sd), "--method", "progressive", "--student-steps", "2"],
                                      "distil"),
        "progressive without steps": (base + ["--teacher", str(guided), "--method", "progressive"], "needs --student-steps"),
        "solver": (base + ["--teacher", str(tiny_sd), "--method", "guidance", "--solver", "dpm"], "set --solver ddim"),
        "weighting": (base + ["--teacher", str(guided), *progressive, "2", "--loss-weighting", "ict"], "set --loss-weighting uniform"),
        "not halving": (base + ["--teacher", str(four_steps), *progressive, "1"], "(--student-steps 2)"),
        "steps not dividing T": (base + ["--teacher", str(guided), *progressive, "3"], "--student-steps 3: the teacher's 6 DDIM steps"),
        "progressive prediction": (base + ["--teacher", str(guided), *progressive, "2", "--student-prediction", "sample"],
                                   "drop --student-prediction"),
        "init prediction": (base + ["--teacher", str(tiny_sd), "--student-init", str(guided), "--student-prediction", "v_prediction"],
                            "set --student-prediction epsilon"),
    }
    argv, message = cases[case]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_guidance_distilled_model_records_the_range_its_omega_input_learned(guided, tmp_path, monkeypatch, capsys):
    """Stage one on g ∈ [1, 4] writes guidance.json beside its export, as an LCM's run does: `lcm generate --sampler ddim`
    samples it at the recorded g by default (not CFG's 7.5, where its ω input extrapolates) and notes a g outside [1, 4]."""
    from latent_consistency import pipelines
    from latent_consistency.guidance_record import read_record

    record = read_record(guided)
    assert (record.guidance_scale_min, record.guidance_scale_max, record.guidance_scale, record.omega_response) == (1.0, 4.0, 4.0, None)
    scales, call = [], pipelines.SolverGenerator.__call__
    monkeypatch.setattr(pipelines.SolverGenerator, "__call__", lambda self, p, n, g, *a: scales.append(g) or call(self, p, n, g, *a))
    common = ["generate", "a red star", "--model", str(guided), "--sampler", "ddim", "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert scales == [4.0] and "note:" not in capsys.readouterr().err
    assert main([*common, "--guidance-scale", "7.5", "--out", str(tmp_path / "outside")]) == 0
    assert "guidance scale 7.5 is outside [1, 4], the range this model's ω input was distilled on" in capsys.readouterr().err


def test_distilling_from_the_guidance_distilled_model_takes_its_range_and_notes_one_outside(guided, image_folder, tmp_path, capsys):
    """LCD from a stage-one model learned on [1, 4]: without a range it distils on [1, 4], its record's (it took the
    preset's [3, 15], where the teacher's guidance extrapolates above 4, as the guide's own commands did); a range given
    outside [1, 4] gets a note (as LCF of an LCM does)."""
    import json

    common = ["distill", "--preset", "tiny", "--teacher", str(guided), "--data", str(image_folder), "--steps", "1",
              "--omega-response-samples", "0"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert "ω input learned" not in capsys.readouterr().err
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert (config["guidance_scale_min"], config["guidance_scale_max"]) == (1.0, 4.0)
    assert main([*common, "--out", str(tmp_path / "outside"), "--guidance-scale-max", "8"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "ω input learned" in line]
    assert len(notes) == 1 and "[1, 8] reaches outside [1, 4]" in notes[0], notes
