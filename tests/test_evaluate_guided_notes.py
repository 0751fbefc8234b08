"""`lcm evaluate` with Guided-Distill models (Meng et al. 2023) beside the LCM: the notes `lcm generate` gives of a
guidance-distilled model sampled outside the range its ω input was distilled on, the report's account of which model
made each Guided-Distill column and whether they come from one teacher, and a guidance-distilled model given as --lcm."""

import shutil

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.guidance_record import GuidanceRecord, write_record

RANGE = ["--guidance-scale-min", "1", "--guidance-scale-max", "2"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A TorchScript network with the FID Inception file's interface: a cheap metric for the table."""

    class StandIn(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)

    path = tmp_path_factory.mktemp("metric") / "stand-in.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


def distill(out, teacher, image_folder, *method):
    assert main(["distill", *method, "--preset", "tiny", "--steps", "1", "--teacher", str(teacher), "--data", str(image_folder),
                 "--out", str(out), *RANGE]) == 0
    return out / "guided"


@pytest.fixture(scope="module")
def chains(tiny_sd, image_folder, tmp_path_factory):
    """Stage one on g in [1, 2] and a 2-step round of it, from the tiny teacher and from another teacher (seed 1)."""
    from tiny_models import save_tiny_sd

    folder = tmp_path_factory.mktemp("chains")
    other = save_tiny_sd(folder / "other-teacher", seed=1)
    made = {}
    for name, teacher in (("", tiny_sd), ("other ", other)):
        made[f"{name}stage one"] = distill(folder / f"{name}stage-one", teacher, image_folder, "--method", "guidance")
        made[f"{name}round"] = distill(folder / f"{name}round", made[f"{name}stage one"], image_folder, "--method", "progressive",
                                       "--student-steps", "2")
    return made


def evaluate(lcm, out, image_folder, stand_in, *extra):
    return ["evaluate", "--lcm", str(lcm), "--prompts", str(image_folder), "--out", str(out), "--steps", "1", "--samples", "2",
            "--inception", str(stand_in), "--device", "cpu", *extra]


def report(out) -> str:
    return (out / "report.md").read_text()


def test_guided_distill_and_an_omega_teacher_get_generates_note_outside_their_range(chains, tiny_lcm, image_folder, stand_in, tmp_path,
                                                                                   capsys):
    """was: no note, where `lcm generate --sampler ddim` of the same model at the same g gives one. The LCM without a record
    sets every row's g (8, lcm generate's); each model is named, and the report keeps the note beside its table."""
    stage_one = chains["stage one"]
    assert main(evaluate(tiny_lcm, tmp_path / "default", image_folder, stand_in, "--guided-distill", str(stage_one),
                         "--teacher", str(stage_one))) == 0
    err = capsys.readouterr().err
    outside = "guidance scale 8 is outside [1, 2], the range this model's ω input was distilled on"
    for option in ("--guided-distill", "--teacher"):
        assert f"{option} {stage_one}: {outside}" in err, err
        assert f"{option} {stage_one}: {outside}" in report(tmp_path / "default")
    assert "every row is at g = 8, the LCM's default" in err and "--guidance-scales 8,2" in err, err
    assert main(evaluate(tiny_lcm, tmp_path / "given", image_folder, stand_in, "--guided-distill", str(chains["round"]),
                         "--guidance-scales", "1.5,8")) == 0
    err = capsys.readouterr().err
    assert f"--guided-distill {chains['round']}: guidance scale 8 is outside [1, 2]" in err and "1.5 is outside" not in err, err
    assert "--guidance-scales 8" not in err  # the scales were given: no hint to give them


def test_the_rows_stay_at_the_lcms_recorded_g(chains, tiny_lcm, image_folder, stand_in, tmp_path, capsys):
    """An LCM whose record's default (3) lies outside the Guided-Distill model's [1, 2]: its rows are at the LCM's g, so that
    the table compares the methods at one g (Table 1), with the note."""
    import json

    lcm = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    write_record(lcm, GuidanceRecord(1.0, 4.0, 3.0))
    assert main(evaluate(lcm, tmp_path / "out", image_folder, stand_in, "--guided-distill", str(chains["stage one"]))) == 0
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["rows"]) == {"lcm|1|3", "guided-distill|1|3"}
    err = capsys.readouterr().err
    assert "guidance scale 3 is outside [1, 2]" in err and "--guidance-scales 3,2" in err and f"--lcm {lcm}:" not in err, err


def test_the_report_names_each_guided_distill_model_and_its_steps(chains, tiny_lcm, image_folder, stand_in, tmp_path):
    """was: one Guided-Distill row, its models unnamed. A stage one and its own round: one teacher, no lineage note."""
    out = tmp_path / "out"
    assert main(evaluate(tiny_lcm, out, image_folder, stand_in, "--guided-distill", str(chains["round"]), str(chains["stage one"]),
                         "--guidance-scale", "2")) == 0
    text = report(out)
    assert f"Guided-Distill (DDIM): `{chains['stage one']}` (stage one: 1 step), `{chains['round']}` (a progressive round: 2 steps)." in text
    assert "different teachers" not in text and "is outside" not in text


def test_guided_distill_models_of_different_teachers_get_a_note(chains, tiny_lcm, image_folder, stand_in, tmp_path):
    """was: a stage one and another teacher's round in one row without a word. Their run folders name each chain's teacher."""
    out = tmp_path / "out"
    assert main(evaluate(tiny_lcm, out, image_folder, stand_in, "--guided-distill", str(chains["stage one"]), str(chains["other round"]),
                         "--guidance-scale", "2")) == 0
    teacher = (chains["other stage one"].parent.parent / "other-teacher").as_posix()
    assert "The Guided-Distill models come from different teachers" in report(out)
    assert f"`{chains['other round']}` from `{teacher}`" in report(out)


def test_a_round_whose_teacher_was_distilled_again_is_not_traced(chains, tiny_lcm, image_folder, stand_in, tmp_path):
    """A link whose model is no longer the one its run recorded (sources.json) ends the trace: no claim either way."""
    from latent_consistency.cli.evaluate import distilled_from

    stage_one = shutil.copytree(chains["stage one"].parent, tmp_path / "stage-one")
    round_run = shutil.copytree(chains["round"].parent, tmp_path / "round")
    config = (round_run / "config.json").read_text().replace(str(chains["stage one"]), str(stage_one / "guided"))
    (round_run / "config.json").write_text(config)
    assert distilled_from(str(round_run / "guided")) == distilled_from(str(chains["stage one"]))
    shutil.copytree(chains["other stage one"] / "unet", stage_one / "guided" / "unet", dirs_exist_ok=True)
    assert distilled_from(str(round_run / "guided")) is None
    assert distilled_from(str(chains["stage one"] / "unet")) is None  # no run folder above


@pytest.mark.parametrize("model, teacher", [("stage one", True), ("round", False)])
def test_a_guidance_distilled_model_as_lcm_is_told_to_give_it_as_guided_distill(model, teacher, chains, image_folder, stand_in, tmp_path,
                                                                               run_error):
    """was: "sample it with an ODE solver (`lcm generate --sampler ddim`)", no option of lcm evaluate. A stage one may also be
    the teacher of the baseline rows; a round, on its own step grid, may not (--teacher refuses it)."""
    path = chains[model]
    code, err = run_error(evaluate(path, tmp_path / "out", image_folder, stand_in))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--guided-distill {path}" in err and (f"--teacher {path}" in err) == teacher and "lcm generate" not in err, err
    assert not (tmp_path / "out").exists()
