"""Inputs of the less-used distillation methods (`--method ode`, Guided-Distill, `--student-init`) that a run must refuse
in one line with exit code 2, losing nothing already written: rather than with a traceback, or by silently ignoring a
flag or reusing a file made with other settings."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from latent_consistency.training.config import DistillConfig, resolve_config
from latent_consistency.training.ode_targets import FILE, ODETargets, bank_settings


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


@pytest.fixture
def distill(tiny_sd, image_folder, tmp_path):
    """`lcm distill --preset tiny` of the tiny teacher into tmp_path/run, with extra flags."""
    return lambda *extra: ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder),
                           "--out", str(tmp_path / "run"), *extra]


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


ODE = ("--method", "ode", "--ode-targets", "6", "--guidance-scale-min", "1", "--guidance-scale-max", "4")


def ode_config(tiny_sd, image_folder, out, ode_targets=6) -> DistillConfig:
    return resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(out), method="ode",
                                                                ode_targets=ode_targets, guidance_scale_min=1.0, guidance_scale_max=4.0))


def random_bank(rows: int, settings: str = "") -> ODETargets:
    """A bank of the tiny teacher's shapes (4 x 8 x 8 latents, 16 x 32 prompt embeddings), random values."""
    g = torch.Generator().manual_seed(0)
    return ODETargets(torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 999), torch.randn(rows, 16, 32, generator=g),
                      torch.rand(rows, 2, generator=g), torch.randn(rows, 2, 4, 8, 8, generator=g), settings)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "not a bank", "another run's", "a folder"])
def test_a_damaged_or_foreign_ode_bank_is_refused_on_resume_and_kept(damage, distill, tiny_sd, image_folder, tmp_path, run_error):
    """A resumed `--method ode` run reads its bank back: one it cannot read, or one solved with other settings (another
    run's, copied in), is refused in one line naming the file, which stays as it was."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(ode_config(tiny_sd, image_folder, out).to_dict()))  # a run stopped before a step
    bank = out / FILE
    good = tmp_path / "good.pt"
    random_bank(6, bank_settings(ode_config(tiny_sd, image_folder, out))).save(good)
    if damage == "truncated":
        bank.write_bytes(good.read_bytes()[:1000])
    elif damage == "empty":
        bank.write_bytes(b"")
    elif damage == "text":
        bank.write_text("hello\n")
    elif damage == "not a bank":
        torch.save({"z": torch.zeros(2)}, bank)
    elif damage == "another run's":
        random_bank(3, bank_settings(ode_config(tiny_sd, image_folder, out, ode_targets=3))).save(bank)
    else:
        bank.mkdir()
    before = bank.read_bytes() if bank.is_file() else None
    refused(run_error, distill(*ODE, "--resume"), str(bank))
    assert (bank.read_bytes() if bank.is_file() else None) == before and bank.exists()
    assert not (out / "checkpoints").exists()


def test_a_bank_with_the_runs_settings_is_read_back(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    settings = bank_settings(ode_config(tiny_sd, image_folder, out))
    random_bank(6, settings).save(out / FILE)
    assert torch.equal(ODETargets.load(out / FILE, settings=settings).z, random_bank(6).z)


def test_a_bank_of_an_older_version_without_settings_is_read_with_a_note(tiny_sd, image_folder, tmp_path, capsys):
    """Banks written before they recorded their settings have nothing to compare: read as the run's (whose config
    resume has checked), with a note, rather than solved again."""
    out = tmp_path / "run"
    out.mkdir()
    random_bank(6).save(out / FILE)
    bank = ODETargets.load(out / FILE, settings=bank_settings(ode_config(tiny_sd, image_folder, out)))
    assert torch.equal(bank.z, random_bank(6).z) and "records no settings" in capsys.readouterr().err


def test_a_student_init_of_other_output_channels_is_refused_before_training(distill, tiny_lcm, tmp_path, run_error):
    from diffusers import UNet2DConditionModel

    init = tmp_path / "init"
    shutil.copytree(tiny_lcm, init)
    config = UNet2DConditionModel.load_config(init, subfolder="unet")
    shutil.rmtree(init / "unet")
    UNet2DConditionModel.from_config(config | {"out_channels": 8}).save_pretrained(init / "unet")
    refused(run_error, distill("--student-init", str(init)), "out_channels")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("extra, message", [
    (["--ode-targets", "6"], "it applies to --method ode"),
    (["--method", "guidance", "--ode-targets", "6"], "it applies to --method ode"),
    (["--method", "ode", "--loss", "l2", "--huber-c", "0.01"], "it applies to --loss huber"),
])
def test_a_flag_the_method_does_not_use_is_refused(extra, message, distill, run_error, tmp_path):
    refused(run_error, distill(*extra, "--dry-run"), message)
    assert not (tmp_path / "run").exists()


def test_a_skip_for_guided_distill_which_has_no_skipping_step_is_refused(distill, run_error, tmp_path):
    refused(run_error, distill("--method", "guidance", "--skip", "50"), "set --skip 20")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("extra", [["--method", "guidance", "--omega-response-samples", "0"], ["--adapter", "lora", "--skip", "50"],
                                   ["--method", "ode", "--ode-targets", "6"], ["--loss", "huber", "--huber-c", "0.01"]])
def test_the_same_flags_where_they_apply_or_say_nothing_are_accepted(extra, distill, run_error):
    assert run_error(distill(*extra, "--dry-run"))[0] == 0


def test_a_preset_with_an_omega_response_count_takes_a_lora_student(tmp_path, run_error):
    """The `world` preset sets --omega-response-samples; as a LoRA student (no ω input, the teacher's parameterisation) it
    skips the measurement, as the flag's help says, and is not refused for a flag the user never gave."""
    from latent_consistency.world.artifact import default_world_path

    argv = ["distill", "--preset", "world", "--adapter", "lora", "--student-prediction", "teacher", "--teacher", str(default_world_path()),
            "--data", "world:shapes", "--out", str(tmp_path / "run"), "--dry-run"]
    assert run_error(argv)[0] == 0


def test_an_omega_learning_rate_for_a_pixart_student_without_an_omega_input_is_refused(image_folder, tmp_path, run_error):
    from tiny_models import save_tiny_pixart

    pixart = save_tiny_pixart(tmp_path / "pixart")
    refused(run_error, ["distill", "--preset", "tiny", "--teacher", str(pixart), "--data", str(image_folder), "--out", str(tmp_path / "o"),
                        "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5", "--omega-lr-scale", "10"],
            "--omega-lr-scale")
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("held_out", [False, True])
def test_the_omega_response_is_measured_on_as_many_latents_as_asked_beyond_one_micro_batch(held_out, distill, image_folder, run_error,
                                                                                          monkeypatch):
    """`--omega-response-samples 10` of a run of micro-batches of 4 (batch 8, two accumulation steps) measures 10 latents,
    not the 4 of one micro-batch."""
    from latent_consistency.training import omega_response

    measured = []
    real = omega_response.omega_response
    monkeypatch.setattr(omega_response, "omega_response",
                        lambda config, teacher, f, latents, *rest: measured.append(len(latents[:config.omega_response_samples]))
                        or real(config, teacher, f, latents, *rest))
    held = ["--eval-data", str(image_folder.parent / "held-out")] if held_out else []
    if held_out:
        shutil.copytree(image_folder, image_folder.parent / "held-out", dirs_exist_ok=True)
    code, err = run_error(distill("--batch-size", "8", "--grad-accumulation", "2", "--steps", "1", "--omega-response-samples", "10", *held))
    assert code == 0, err
    assert measured == [10]


def test_method_ode_under_bf16_mixed_precision_solves_its_bank_with_the_half_precision_teacher(distill, tmp_path):
    """With --mixed-precision the frozen teacher runs in half precision: the bank is solved under autocast, as LCD's jumps are.
    In a process of its own: accelerate keeps one mixed-precision setting per process, and other tests ran without one."""
    argv = distill(*ODE, "--mixed-precision", "bf16", "--steps", "1", "--omega-response-samples", "0")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "latent_consistency.cli", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    bank = ODETargets.load(tmp_path / "run" / FILE)
    assert len(bank) == 6 and torch.isfinite(bank.solution).all()
    assert (tmp_path / "run" / "lcm" / "model_index.json").is_file()
