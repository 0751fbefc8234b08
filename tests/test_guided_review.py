"""Guided-Distill paths after a review (/tmp/h/guided-report.md, findings 1, 2, 5-8): a student keeps the ω embedding
size of the UNet it starts from without --time-cond-proj-dim, a resume finds a --student-init cleared away under the
name it was given, a preset's LCD settings are no request of Guided-Distill's stages, a folder that is no starting
model says what it is, and the notes and records of a run from another model's ω input."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from command_helpers import dry_run, refused
from latent_consistency.cli import main
from latent_consistency.guidance_record import GuidanceRecord, write_record
from latent_consistency.training import sources
from latent_consistency.training.config import DistillConfig
from latent_consistency.training.loop import student_init_range_note, student_init_teacher_note, validation_scale_note
from latent_consistency.training.model_card import model_card
from tiny_models import make_tiny_components, save_tiny_lora, write_captioned_images

OMEGA_SIZE = 16  # the stand-in stage-one model's: neither the tiny preset's 32 nor the default 256
# A few seconds a run: no ω response at the end (32 latents' teacher ODE solutions, most of a tiny run's time otherwise)
FAST = ["--steps", "1", "--batch-size", "2", "--lr-warmup-steps", "0", "--validate-every", "0", "--checkpoint-every", "0",
        "--omega-response-samples", "0"]


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A guidance-distilled model as `--method guidance` exports one (a StableDiffusionPipeline whose UNet has an ω input, and
    its guidance record: g in [1, 2]), untrained: what these tests read is its form, not its weights."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("models") / "stage-one"
    parts = make_tiny_components(folder.parent / ".stage-one-build", time_cond_proj_dim=OMEGA_SIZE, seed=3)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    write_record(folder, GuidanceRecord(1.0, 2.0, 2.0))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("images"), 4)


def distill(teacher, images, out, *extra) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--data", str(images), "--out", str(out), *extra]




def test_the_student_takes_the_omega_size_of_the_unet_it_starts_from(stage_one, tiny_sd, images, tmp_path, capsys):
    """Finding 1. Was: "the student starts from ..., whose ω embedding has size 16: --time-cond-proj-dim 256 cannot change it"
    (256 the field's default, 32 with --preset tiny) for a progressive round, LCD from a stage-one teacher and
    --student-init, which then needed a flag that only repeated the model's own size."""
    progressive = ["--method", "progressive", "--student-steps", "2"]
    for extra in ([], ["--preset", "tiny"]):
        assert dry_run(capsys, distill(stage_one, images, tmp_path / "x", *progressive, *extra))["time_cond_proj_dim"] == OMEGA_SIZE
        assert dry_run(capsys, distill(stage_one, images, tmp_path / "x", *extra))["time_cond_proj_dim"] == OMEGA_SIZE
        assert dry_run(capsys, distill(tiny_sd, images, tmp_path / "x", "--student-init", str(stage_one), *extra))["time_cond_proj_dim"] == OMEGA_SIZE
    # a new ω input (a teacher without one) gets the preset's size, else 256
    assert dry_run(capsys, distill(tiny_sd, images, tmp_path / "x"))["time_cond_proj_dim"] == 256
    assert dry_run(capsys, distill(tiny_sd, images, tmp_path / "x", "--preset", "tiny"))["time_cond_proj_dim"] == 32
    runs = {"round": distill(stage_one, images, tmp_path / "round", *progressive, "--preset", "tiny", *FAST),
            "init": distill(tiny_sd, images, tmp_path / "init", "--student-init", str(stage_one), *FAST)}
    for name, argv in runs.items():
        assert main(argv) in (0, None), name
        export = tmp_path / name / ("guided" if name == "round" else "lcm")
        assert json.loads((export / "unet" / "config.json").read_text())["time_cond_proj_dim"] == OMEGA_SIZE
    capsys.readouterr()


def test_an_omega_size_the_user_gives_is_still_checked_and_a_resume_refuses_a_changed_one(stage_one, tiny_sd, images, tmp_path,
                                                                                           run_error):
    """The refusals that were right stay: a size the starting UNet lacks (now at --dry-run, before the model loads), from a
    flag or a config file, and a resume with another size than the run's, given or left to the default."""
    round_argv = distill(stage_one, images, tmp_path / "x", "--method", "progressive", "--student-steps", "2")
    refused(run_error, [*round_argv, "--time-cond-proj-dim", "64", "--dry-run"],
            "whose ω embedding has size 16: --time-cond-proj-dim 64 cannot change it; leave it out")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"time_cond_proj_dim": 64}))
    refused(run_error, [*round_argv, "--config", str(config), "--dry-run"], "config field time_cond_proj_dim 64 cannot change it")
    argv = distill(tiny_sd, images, tmp_path / "run", *FAST[2:])
    assert run_error([*argv, "--steps", "1", "--time-cond-proj-dim", "64"])[0] == 0
    refused(run_error, [*argv, "--steps", "2", "--time-cond-proj-dim", "128", "--resume"], "time_cond_proj_dim: 64 -> 128")
    refused(run_error, [*argv, "--steps", "2", "--resume"], "time_cond_proj_dim: 64 -> 256")
    assert run_error([*argv, "--steps", "2", "--time-cond-proj-dim", "64", "--resume"])[0] == 0


@pytest.mark.parametrize("name", ["init_a", "starts/init_a"])
def test_a_resume_finds_a_student_init_cleared_away_under_its_relative_name(name, stage_one, tiny_sd, images, tmp_path, monkeypatch,
                                                                          run_error):
    """Finding 2. Was: "run was started with a different config (student_init: '/…/init_a' -> 'init_a')": a relative path was
    made absolute only while it existed (and `starts/init_a`, gone, looks like a hub id)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(stage_one, name)
    argv = distill(tiny_sd, images, "run", "--student-init", name, *FAST[2:])
    assert run_error([*argv, "--steps", "1", "--checkpoint-every", "1"])[0] == 0
    shutil.rmtree(Path(name).parts[0])
    code, err = run_error([*argv, "--steps", "2", "--checkpoint-every", "1", "--resume"])
    assert code == 0, err
    assert os.path.abspath(json.loads(Path("run/config.json").read_text())["student_init"]) == os.path.abspath(name)


def test_a_missing_relative_source_is_recorded_absolute_and_other_specs_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded = DistillConfig(teacher="org/model", data="world:shapes", student_init="gone", eval_data="shards/{0..3}.tar").to_dict()
    assert recorded["student_init"] == str(tmp_path / "gone")
    assert (recorded["teacher"], recorded["data"]) == ("org/model", "world:shapes")
    assert recorded["eval_data"] == str(tmp_path / "shards/{0..3}.tar")  # a local shard pattern, from the root


def test_a_presets_lcd_settings_are_no_request_of_guided_distill(run_error, capsys, tmp_path):
    """Finding 5. Was: `--preset world-ode --method guidance` refused for "--adapter lora, --guidance-pair-weight and
    --student-init", none given (the preset's λ_Δ = 10), and `--preset world --method guidance` told to "set
    --loss-weighting uniform" (the preset's ict)."""
    base = ["distill", "--teacher", "org/t", "--data", "world:shapes", "--out", str(tmp_path / "run"), "--method", "guidance"]
    printed = dry_run(capsys, [*base, "--preset", "world-ode"])
    assert (printed["guidance_pair_weight"], printed["loss_weighting"], printed["lr"]) == (0.0, "uniform", 2e-4)
    assert dry_run(capsys, [*base, "--preset", "world"])["loss_weighting"] == "uniform"
    code, err = run_error([*base, "--guidance-pair-weight", "5", "--dry-run"])
    assert code == 2 and "--guidance-pair-weight 5 applies to --method lcd and ode" in err and "--adapter" not in err, err
    refused(run_error, [*base, "--preset", "world", "--loss-weighting", "ict", "--dry-run"], "set --loss-weighting uniform")
    refused(run_error, [*base, "--preset", "sdxl-lora", "--dry-run"], "--preset sdxl-lora trains LoRA adapters")


def test_guided_distill_prints_no_omega_response_count(capsys, tmp_path):
    """Finding 8. Was: --dry-run of `--method guidance` printed omega_response_samples 32 (the field's default) for a method
    that measures none."""
    base = ["distill", "--teacher", "org/t", "--data", "world:shapes", "--out", str(tmp_path / "run"), "--method", "guidance"]
    for extra in ([], ["--preset", "tiny"]):
        assert dry_run(capsys, [*base, *extra])["omega_response_samples"] == 0


def test_a_folder_that_is_no_starting_model_says_what_it_is(stage_one, tiny_sd, images, tmp_path, run_error):
    """Finding 6. Was: diffusers' "Error no file named config.json found in directory ..." for an LCM-LoRA, and "give a
    diffusers folder with unet/ and scheduler/" for the run folder that holds one."""
    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    run = tmp_path / "gd"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    shutil.copytree(stage_one, run / "guided")
    refused(run_error, distill(tiny_sd, images, tmp_path / "a", "--student-init", str(lora)), f"--student-init {lora} is an LCM-LoRA")
    refused(run_error, distill(tiny_sd, images, tmp_path / "b", "--student-init", str(run)),
            f"is a training run's folder: give the model it exported, {run / 'guided'}")


def test_the_world_guided_preset_refuses_a_student_init_that_is_no_lcm(stage_one, tiny_lcm, tmp_path, run_error, capsys):
    """Finding 7. Was: accepted without a word, though the preset continues a `world-ode` LCM at lr 3e-6."""
    base = ["distill", "--preset", "world-guided", "--teacher", "org/t", "--data", "world:shapes", "--out", str(tmp_path / "run")]
    refused(run_error, [*base, "--student-init", str(stage_one), "--dry-run"], f"--student-init {stage_one} is no LCM")
    assert dry_run(capsys, [*base, "--student-init", str(tiny_lcm)])["time_cond_proj_dim"] == 32  # the LCM's, not the preset's 64


def fake_run(folder: Path, model: Path, teacher: str, teacher_identity: str) -> Path:
    """A run folder as `lcm distill` leaves one (config.json and sources.json naming its teacher) around a copy of `model`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"teacher": teacher}))
    (folder / sources.FILE).write_text(json.dumps({"teacher": teacher_identity}))
    return shutil.copytree(model, folder / "guided")


def test_a_student_init_of_another_teacher_gets_a_note_and_one_of_this_teacher_none(stage_one, tiny_sd, tiny_lcm, tmp_path):
    """Finding 7: the teachers a --student-init descends from (a progressive round's stage one, its teacher) are followed
    through their run folders; none of them --teacher, a note."""
    ours = fake_run(tmp_path / "gd", stage_one, str(tiny_sd), sources.model_digest(str(tiny_sd)))
    theirs = fake_run(tmp_path / "gd-other", stage_one, str(tiny_lcm), sources.model_digest(str(tiny_lcm)))
    round_of_ours = fake_run(tmp_path / "round", stage_one, str(ours), sources.model_digest(str(ours)))
    note = student_init_teacher_note(DistillConfig(teacher=str(tiny_sd), student_init=str(theirs)))
    assert note is not None and "was distilled from another teacher than --teacher" in note
    for init in (ours, round_of_ours, stage_one):  # this teacher's line, or no run's export: nothing to say
        assert student_init_teacher_note(DistillConfig(teacher=str(tiny_sd), student_init=str(init))) is None


def test_guidance_outside_the_student_inits_range_gets_a_note(stage_one):
    """Finding 7. Was: no note for LCD at g in [3, 15] from a --student-init whose ω input learned [1, 2] (only the teacher's
    record was read)."""
    note = student_init_range_note(DistillConfig(teacher="t", student_init=str(stage_one)))
    assert note is not None and "[3, 15] reaches outside [1, 2], the range the ω input of --student-init" in note
    inside = DistillConfig(teacher="t", student_init=str(stage_one), guidance_scale_min=1.0, guidance_scale_max=2.0)
    assert student_init_range_note(inside) is None


def test_a_validation_guidance_scale_moved_into_the_range_gets_a_note():
    """Finding 8. Was: `--validation-guidance-scale 20` over g in [1, 2] became g = 2 without a word."""
    student = SimpleNamespace(adapter="full", target_unet=SimpleNamespace(config={"time_cond_proj_dim": 32}))
    base = SimpleNamespace(guidance_record=None)

    def note(g, student=student):
        config = DistillConfig(teacher="t", method="guidance", guidance_scale_min=1.0, guidance_scale_max=2.0, validation_guidance_scale=g)
        return validation_scale_note(config, base, student)

    assert "--validation-guidance-scale 20 is outside [1, 2]" in note(20.0) and "default g are 2" in note(20.0)
    assert note(1.5) is None and note(8.0) is None  # inside, or the default (the field's help says it moves)
    assert note(20.0, SimpleNamespace(adapter="lora", target_unet=SimpleNamespace(config={}))) is None  # a LoRA keeps no record


def test_the_notes_of_a_run_from_another_models_omega_input(stage_one, tiny_lcm, tiny_sd, images, tmp_path, capsys):
    """The three notes above are what a run prints."""
    theirs = fake_run(tmp_path / "gd-other", stage_one, str(tiny_lcm), sources.model_digest(str(tiny_lcm)))
    argv = distill(tiny_sd, images, tmp_path / "run", "--student-init", str(theirs), "--method", "lcd", "--validation-guidance-scale", "20",
                   *FAST)
    assert main(argv) in (0, None)
    err = capsys.readouterr().err
    for said in ("was distilled from another teacher", "the range the ω input of --student-init", "--validation-guidance-scale 20"):
        assert said in err, said


def test_the_model_card_records_its_sources_as_config_json_does_and_names_a_progressive_round(tmp_path, monkeypatch):
    """Finding 8. Was: "From: the teacher `gd1/guided`" and "Data: `cache`" where config.json says absolute paths, and a
    round's card titled "Guidance-distilled gd1/guided" like a stage one's."""
    monkeypatch.chdir(tmp_path)
    for name in ("gd1/guided", "cache"):
        (tmp_path / name).mkdir(parents=True)
    config = DistillConfig(teacher="gd1/guided", data="cache", out="round", method="progressive", student_steps=4)
    card = model_card(Path("round/guided"), config, GuidanceRecord(1.0, 2.0, 2.0))
    assert f"From: the teacher `{tmp_path / 'gd1' / 'guided'}`" in card and f"Data: `{tmp_path / 'cache'}`" in card
    assert "# 4-step progressive distillation of gd1/guided" in card
