"""Guided-Distill's chains as a user runs them: stage one (`--method guidance`), progressive rounds from it, and what the
next command does with each model. Tiny models, one training step each."""

import pytest

from latent_consistency.cli import main


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


RANGE = ["--guidance-scale-min", "1", "--guidance-scale-max", "4"]


@pytest.fixture(scope="module")
def stage_one(tiny_sd, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gd") / "stage-one"
    assert main(["distill", "--method", "guidance", "--preset", "tiny", "--steps", "1", "--teacher", str(tiny_sd), "--data", str(image_folder),
                 "--out", str(out), *RANGE]) == 0
    return out / "guided"


@pytest.fixture(scope="module")
def round_one(stage_one, image_folder, tmp_path_factory):
    """Round 1: the stage-one model's 4 DDIM steps in 2."""
    out = tmp_path_factory.mktemp("gd") / "round-one"
    assert main(["distill", "--method", "progressive", "--student-steps", "2", "--preset", "tiny", "--steps", "1", "--teacher", str(stage_one),
                 "--data", str(image_folder), "--out", str(out), *RANGE]) == 0
    return out / "guided"


@pytest.mark.parametrize("method", ["lcd", "ode"])
def test_an_lcm_is_not_distilled_from_a_progressive_round(method, round_one, image_folder, tmp_path, run_error):
    """A round's network gives the x̂0 whose one DDIM jump on its own 2-step grid lands where its teacher's two jumps do;
    LCD's jumps of k (or the ODE bank's solves) through it follow no teacher's ODE.
    was: `lcm distill --teacher ROUND/guided` (lcd or ode) ran and exported an LCM distilled from that other ODE, without
    a word; now it is refused in one line, pointing at the stage-one model, and nothing is written."""
    out = tmp_path / "lcm"
    extra = ["--ode-targets", "2"] if method == "ode" else []
    code, err = run_error(["distill", "--method", method, "--preset", "tiny", "--steps", "1", "--teacher", str(round_one),
                           "--data", str(image_folder), "--out", str(out), *RANGE, *extra])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "progressively distilled to sample in 2 DDIM steps" in err and "stage-one model" in err, err
    assert not out.exists()


def test_generate_samples_a_progressive_round_in_the_steps_it_was_distilled_for(round_one, tmp_path, monkeypatch, capsys):
    """was: `lcm generate --model ROUND/guided --sampler ddim` without --steps sampled the 2-step round in 4 DDIM steps (the
    LCM default), and --steps 3 or --sampler dpm++ ran off the round's grid, all without a word; now the default is the
    round's 2 steps, and other steps or another sampler get a note."""
    from latent_consistency import pipelines

    steps, call = [], pipelines.SolverGenerator.__call__
    monkeypatch.setattr(pipelines.SolverGenerator, "__call__", lambda self, p, n, *a: steps.append(n) or call(self, p, n, *a))
    common = ["generate", "a red star", "--model", str(round_one)]
    assert main([*common, "--sampler", "ddim", "--out", str(tmp_path / "default")]) == 0
    assert steps == [2] and "note:" not in capsys.readouterr().err
    for i, other in enumerate((["--sampler", "ddim", "--steps", "3"], ["--sampler", "dpm++", "--steps", "2"])):
        assert main([*common, *other, "--out", str(tmp_path / str(i))]) == 0
        assert "progressively distilled for 2 DDIM steps" in capsys.readouterr().err


def test_evaluate_refuses_a_progressive_round_as_the_teacher(round_one, tiny_lcm, image_folder, tmp_path, run_error):
    """was: `lcm evaluate --teacher ROUND/guided` scored the 2-step round with DDIM and DPM-Solver at the LCM's step
    counts (off its grid) as "the teacher"; now it is refused in one line, pointing at --guided-distill."""
    from test_guided_distill import inception_stand_in

    out = tmp_path / "table"
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--teacher", str(round_one), "--prompts", str(image_folder),
                           "--out", str(out), "--steps", "1", "--samples", "4", "--device", "cpu",
                           "--inception", str(inception_stand_in(tmp_path))])
    assert code == 2 and len(err.splitlines()) == 1 and "give it with --guided-distill" in err, err
    assert not out.exists()


def test_a_rounds_step_count_is_recorded_beside_its_scheduler_config_not_in_it(round_one):
    """was: `distilled_steps` was written into scheduler_config.json too, and diffusers warned "config attributes
    {'distilled_steps': 2} ... will be ignored" at every load of the round."""
    import json

    from latent_consistency.models import load_diffusion_model

    assert "distilled_steps" not in json.loads((round_one / "scheduler" / "scheduler_config.json").read_text())
    assert load_diffusion_model(str(round_one)).distilled_steps == 2
