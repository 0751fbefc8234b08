"""What a training run reports and which models it accepts, where the user could not tell it was wrong: the ω projection's
learning rate in the metrics, what the data skipped over a resumed run, and an ε-prediction model on a schedule that ends
at zero SNR."""

import json
import shutil

import pytest
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.schedule import make_betas
from latent_consistency.training.batches import TrainingBatches, merged_skipped_summary
from test_imagefolder import truncated_png
from tiny_models import write_captioned_images


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_omega_projections_learning_rate_is_in_the_metrics(tiny_sd, tmp_path):
    """was: metrics.jsonl held `lr`, the optimiser's first group's rate only: with --omega-lr-scale the ω projection trains at
    another rate, which nothing the run wrote showed. Now it is `omega_lr`, beside `lr` (kept: every reader knows it), on the
    warm-up as the network's rate is."""
    out = tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(write_captioned_images(tmp_path / "data", 4)),
                 "--out", str(out), "--steps", "2", "--checkpoint-every", "0", "--lr-warmup-steps", "4", "--omega-lr-scale", "25",
                 "--validation-prompts", "a red star"]) == 0
    rows = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert [row["lr"] for row in rows] == pytest.approx([2.5e-5, 5e-5])  # 1e-4 over a 4-step warm-up
    assert [row["omega_lr"] for row in rows] == pytest.approx([6.25e-4, 1.25e-3])


def skip_folder(folder):
    """16 captioned images, two of which the data skips or converts: 3.png cut short, 5.png grayscale."""
    write_captioned_images(folder, 16)
    (folder / "3.png").write_bytes(truncated_png())
    Image.open(folder / "5.png").convert("L").save(folder / "5.png")
    return folder


def batches_of(folder, model, num_workers=0) -> TrainingBatches:
    return TrainingBatches(str(folder), model, 16, 2, seed=0, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_what_the_data_skipped_before_a_resume_is_in_the_runs_summary(tiny_sd, tmp_path, num_workers):
    """was: a run resumed from its checkpoint summed up only what its data skipped and converted since the resume: an image
    folder whose corrupt and grayscale images were read before the checkpoint (the corrupt one read again since) said
    "skipped: corrupt=1" where the uninterrupted run said "skipped: corrupt=1; converted: grayscale=1". The counts now go
    in the checkpoint with the data position (through JSON, as state.json holds them); an image read both before and after
    the resume, or read by DataLoader workers, still counts once."""
    from latent_consistency.models import load_diffusion_model

    model, folder = load_diffusion_model(str(tiny_sd)), skip_folder(tmp_path / "data")
    # Seed 0 draws the images 2 11 3 10 0 4 7 5 | 14 12 6 9 13 8 1 15, then 11 0 10 7 4 1 15 9 3 14 6 13 ...: 3 and 5 in the first
    # 4 micro-batches of 2, 3 again in the 14th
    uninterrupted = batches_of(folder, model, num_workers)
    for _ in range(14):
        next(uninterrupted)
    expected = merged_skipped_summary([uninterrupted.skipped_record()])
    assert expected == "skipped: corrupt=1; converted: grayscale=1"

    before = batches_of(folder, model, num_workers)
    for _ in range(4):
        next(before)
    resumed = batches_of(folder, model, num_workers)
    resumed.load_state_dict(json.loads(json.dumps(before.state_dict())))
    for _ in range(10):
        next(resumed)
    assert merged_skipped_summary([resumed.skipped_record()]) == expected
    # A second resume, from a checkpoint of the resumed run: nothing is counted twice
    again = batches_of(folder, model, num_workers)
    again.load_state_dict(json.loads(json.dumps(resumed.state_dict())))
    assert merged_skipped_summary([again.skipped_record()]) == expected


def test_a_resumed_runs_printed_data_summary_is_the_uninterrupted_runs(tiny_sd, tmp_path, capsys):
    """The same through `lcm distill`: a run stopped after its checkpoint at step 2 and resumed prints the data summary of the
    run that was never stopped, where it printed only what the steps after the resume read."""
    folder = skip_folder(tmp_path / "data")
    args = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(folder), "--batch-size", "2",
            "--validation-prompts", "a red star", "--checkpoint-every", "2"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert whole == ["data: skipped: corrupt=1; converted: grayscale=1"]
    out = tmp_path / "stopped"
    assert main([*args, "--out", str(out), "--steps", "2"]) == 0
    shutil.rmtree(out / "lcm")
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")] == whole


def epsilon_model_ending_at_beta_one(model, folder):
    """A copy of `model` (an ε-prediction one) whose scheduler config gives SD's betas rescaled to zero terminal SNR as
    trained_betas: the last β is 1 and ᾱ_{T-1} = 0, with no rescale_betas_zero_snr flag to say so."""
    shutil.copytree(model, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    betas = make_betas(1000, config["beta_start"], config["beta_end"], config["beta_schedule"], rescale_betas_zero_snr=True)
    assert betas[-1] == 1 and config["prediction_type"] == "epsilon"
    path.write_text(json.dumps(config | {"trained_betas": betas.tolist()}))
    return folder


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_an_epsilon_model_whose_betas_end_at_one_is_refused_in_one_line(tiny_lcm, tmp_path, run_error, command):
    """was: refused only where its scheduler config said rescale_betas_zero_snr; with the same schedule as trained_betas `lcm
    generate` wrote an image from latents of size 1.5e4 (x̂0 = (z - σ·ε̂)/α divided by α_{T-1} = 2^-12 at the first step, where
    diffusers' DDIM and LCM schedulers divide by 0: no behaviour of diffusers to follow) and `lcm evaluate` scored such
    images. Now every command refuses it when it loads, in one line naming v-prediction, before anything is written."""
    from tiny_models import save_tiny_clip

    model, out = epsilon_model_ending_at_beta_one(tiny_lcm, tmp_path / "model"), tmp_path / "out"
    if command == "generate":
        argv = ["generate", "a red star", "--model", str(model), "--out", str(out)]
    else:
        (tmp_path / "prompts.txt").write_text("a red star\na blue ring\n")
        argv = ["evaluate", "--lcm", str(model), "--prompts", str(tmp_path / "prompts.txt"), "--reference",
                str(write_captioned_images(tmp_path / "images", 4)), "--clip", str(save_tiny_clip(tmp_path / "clip")), "--steps", "1",
                "--out", str(out)]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "predicts ε on a zero-terminal-SNR schedule (its betas end at β = 1)" in err and "v_prediction" in err, err
    assert not out.exists()
