"""`lcm distill` on a tiny teacher: runs, exports, resumes exactly, LoRA interop, error contract."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latent_consistency.cli import main
from latent_consistency.errors import UserError
from latent_consistency.training.config import DistillConfig, resolve_config
from tiny_models import sample_as_its_model_card_says
from two_processes import DATA_PARALLEL, launch

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 24)


def read_metrics(out: Path, key: str = "loss") -> list[dict]:
    """The lines of a run's metrics.jsonl that hold `key` (training lines: "loss")."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if key in m]


def distill_args(tiny_sd, data, out, *extra):
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), *extra]


@pytest.fixture(params=["distill", "distill-ode", "finetune"])
def run_args(request, tiny_sd, tiny_lcm):
    """`lcm distill` of the tiny teacher (LCD, or regression onto a bank of its ODE solutions), or `lcm finetune` of the tiny
    LCM: one loop, the same guarantees."""
    if request.param == "distill":
        return lambda data, out, *extra: distill_args(tiny_sd, data, out, *extra)
    if request.param == "distill-ode":
        return lambda data, out, *extra: distill_args(tiny_sd, data, out, "--method", "ode", "--ode-targets", "8",
                                                      "--guidance-scale-min", "1", "--guidance-scale-max", "4", *extra)
    return lambda data, out, *extra: ["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(data), "--out", str(out),
                                      *extra]


def test_distill_exports_an_lcm_diffusers_runs(tiny_sd, image_folder, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, image_folder, out, "--solver", "dpm++", "--loss", "l2")) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    # The student's ω response at the end, at the 4-step sampler's timesteps (T/k = 50 steps) and one small t
    (response,) = read_metrics(out, "omega_response_999")
    assert response["step"] == 4 and set(response) == {"step"} | {f"omega_response_{t}" for t in (999, 759, 499, 259, 99)}
    assert all(np.isfinite(v) for v in response.values())
    # Beside the export, what guidance it was distilled for: the preset's range, its validation g, that response
    assert json.loads((out / "lcm" / "guidance.json").read_text()) == {
        "guidance_scale_min": 3.0, "guidance_scale_max": 15.0, "guidance_scale": 8.0,
        "omega_response": {k.removeprefix("omega_response_"): v for k, v in response.items() if k != "step"}}
    assert json.loads((out / "config.json").read_text())["solver"] == "dpm++"
    assert (out / "samples" / "step-0000004.png").is_file()
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.original_inference_steps == 50
    image = pipe("a red star", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    card, image = sample_as_its_model_card_says(out / "lcm")  # its model card's usage runs as written
    assert card.data.base_model is None and "ω response at t = 999 / 759 / 499 / 259 / 99" in card.text  # a local teacher
    assert "pipe(\"a red star number" in card.text  # its usage samples a prompt of the run's own (a validation prompt)
    assert np.isfinite(np.asarray(image)).all()


def test_v_prediction_student_of_an_epsilon_teacher_exports_and_runs_in_diffusers(tiny_sd, image_folder, tmp_path):
    """The student's parameterisation is recorded in the exported scheduler config, so the LCMScheduler reads
    the network's output as the student was trained; its first-step image equals ours."""
    from diffusers import LatentConsistencyModelPipeline

    from latent_consistency.models import load_lcm
    from latent_consistency.parameterization import omega_from_guidance_scale
    from latent_consistency.sampling import sample_lcm

    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, image_folder, out, "--student-prediction", "v_prediction")) == 0
    assert json.loads((out / "lcm" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    noise = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    theirs = pipe("a red star", num_inference_steps=1, guidance_scale=8.0, latents=noise.clone(), output_type="latent",
                  height=size * pipe.vae_scale_factor, width=size * pipe.vae_scale_factor).images
    model = load_lcm(str(out / "lcm"))
    assert model.prediction_type == "v_prediction"
    f = model.consistency_model()
    ours = sample_lcm(f, noise, model.timesteps(1), model.prompts.encode(["a red star"]),
                      omega_from_guidance_scale(8.0), f.schedule)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_dry_run_prints_resolved_config(tiny_sd, image_folder, tmp_path, capsys):
    assert main(distill_args(tiny_sd, image_folder, tmp_path / "run", "--lr", "3e-5", "--dry-run")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 3e-5 and printed["steps"] == 4 and printed["objective"] == "lcd"
    assert not (tmp_path / "run").exists()


def final_student(out: Path) -> dict:
    ckpts = sorted((out / "checkpoints").iterdir())
    return load_file(str(ckpts[-1] / "student.safetensors")) | {
        "target." + k: v for k, v in load_file(str(ckpts[-1] / "target.safetensors")).items()}


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(run_args, image_folder, tmp_path):
    args = ["--steps", "8", "--checkpoint-every", "2", "--keep-checkpoints", "10", "--batch-size", "4", "--lr", "1e-3"]
    reference = tmp_path / "reference"
    assert main(run_args(image_folder, reference, *args)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "latent_consistency.cli", *run_args(image_folder, killed, *args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000004").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lcm").exists(), "the run finished before it could be killed"
    # A half-written checkpoint must never be picked: fake one from a later step.
    partial = killed / "checkpoints" / "step-0000007.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "student.safetensors").write_bytes(b"garbage")
    assert main(run_args(image_folder, killed, *args, "--resume")) == 0

    ref, res = final_student(reference), final_student(killed)
    assert ref.keys() == res.keys()
    for k in ref:
        assert torch.equal(ref[k], res[k]), k
    assert read_metrics(reference)[-1]["loss"] == read_metrics(killed)[-1]["loss"]
    assert read_metrics(reference, "omega_response_999") == read_metrics(killed, "omega_response_999")


@pytest.mark.slow
@pytest.mark.parametrize("run_args", ["distill", "finetune"], indirect=True)  # --method ode's: test_ode_bank_processes
def test_two_processes_share_one_global_batch_and_only_rank0_writes(run_args, image_folder, tmp_path):
    """Two CPU processes (torchrun through accelerate; gloo) train with the same global batch."""
    out = tmp_path / "ddp"
    done = launch(DATA_PARALLEL, ["-m", "latent_consistency.cli", *run_args(image_folder, out, "--batch-size", "4")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("exported") == 1
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    # 4 steps x global batch 4 = 16 samples of 24: both ranks stand at global position 16.
    assert [d["sampler"] for d in state["data"]] == [{"epoch": 0, "index": 16, "num_samples": 24}] * 2
    assert state["data"][0]["fingerprint"] == state["data"][1]["fingerprint"]  # the same folder, read by both
    assert (out / "lcm" / "model_index.json").is_file()


def test_lora_export_loads_with_load_lora_weights(tiny_sd, image_folder, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    out = tmp_path / "lora-run"
    assert main(distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--lora-rank", "4", "--lr", "1e-3", "--skip", "25")) == 0
    assert not (out / "checkpoints" / "step-0000004" / "target.safetensors").exists()  # no separate target
    # the sampler settings are saved beside the weights, and `lcm generate --lora` reads them
    assert json.loads((out / "lora" / "scheduler_config.json").read_text())["original_inference_steps"] == 40
    assert main(["generate", "a red star", "--model", str(tiny_sd), "--lora", str(out / "lora"), "--steps", "40",
                 "--height", "16", "--width", "16", "--out", str(tmp_path / "images")]) == 0
    assert Image.open(tmp_path / "images" / "0000-a-red-star.png").size == (16, 16)
    assert main(["generate", "a", "--model", str(tiny_sd), "--lora", str(out / "lora"), "--steps", "41", "--out", str(tmp_path / "x")]) == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    z, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        before = pipe.unet(z, t, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(out / "lora")
        after = pipe.unet(z, t, encoder_hidden_states=cond).sample
    assert not torch.allclose(before, after), "the LoRA changed nothing"
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red star", num_inference_steps=2, guidance_scale=1.0, height=16, width=16, output_type="np").images
    assert np.isfinite(image).all()
    card, image = sample_as_its_model_card_says(out / "lora")  # its model card's usage runs as written
    assert "lcm-lora" in card.data.tags and np.isfinite(np.asarray(image)).all()


def test_nonfinite_losses_stop_with_a_checkpoint(tiny_sd, image_folder, tmp_path, monkeypatch):
    from latent_consistency.training import loop

    def nan_loss(config, base, scheduler_config, ode_targets=None):
        def loss(student, target, latents, cond, uncond, generator):
            return student(latents, torch.full((len(latents),), 999), cond, 3.0).mean(dim=(1, 2, 3)) * float("nan")
        return loss

    monkeypatch.setattr(loop, "build_loss", nan_loss)
    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path / "nan"),
                                                   steps=10, max_nonfinite_steps=3))
    with pytest.raises(UserError, match="not finite for 3 steps in a row.*checkpoint saved"):
        loop.train(config, progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "step-0000000" / "state.json").is_file()
    state = json.loads((tmp_path / "nan" / "checkpoints" / "step-0000000" / "state.json").read_text())
    assert state["nonfinite_total"] == 3


@pytest.mark.parametrize("case", ["missing teacher", "missing data", "bad solver", "bad loss", "bad weighting", "resolution", "not empty",
                                  "resume differs", "resume nothing", "batch split", "bad student prediction",
                                  "lora student prediction", "lora guidance pair", "fixed guidance pair", "ε at zero terminal SNR",
                                  "ε student at zero terminal SNR", "omega lr scale 0", "lora omega lr scale",
                                  "lora omega embedding", "lora omega response"])
def test_bad_input_one_line_exit_2(tiny_sd, image_folder, tmp_path, capsys, case):
    out = tmp_path / "run"
    cases = {
        "missing teacher": (distill_args(tmp_path / "none", image_folder, out), "does not exist"),
        "missing data": (distill_args(tiny_sd, tmp_path / "nodata", out), "cannot read data spec"),
        "bad solver": (distill_args(tiny_sd, image_folder, out, "--solver", "heun"), "unknown solver 'heun'"),
        "bad loss": (distill_args(tiny_sd, image_folder, out, "--loss", "l1"), "unknown loss 'l1'"),
        "bad weighting": (distill_args(tiny_sd, image_folder, out, "--loss-weighting", "snr"), "unknown loss weighting 'snr'"),
        "resolution": (distill_args(tiny_sd, image_folder, out, "--resolution", "15"), "not a multiple of the VAE factor"),
        "not empty": (distill_args(tiny_sd, image_folder, tmp_path / "full"), "is not empty"),
        "resume differs": (distill_args(tiny_sd, image_folder, out, "--lr", "5e-4", "--resume"), "lr: 0.0001 -> 0.0005"),
        "resume nothing": (distill_args(tiny_sd, image_folder, tmp_path / "full", "--resume"), "nothing to resume"),
        "batch split": (distill_args(tiny_sd, image_folder, out, "--batch-size", "3", "--grad-accumulation", "2"), "multiple of"),
        "bad student prediction": (distill_args(tiny_sd, image_folder, out, "--student-prediction", "x0"), "--student-prediction 'x0'"),
        "lora student prediction": (distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--student-prediction", "sample"),
                                    "a LoRA keeps the teacher's parameterisation"),
        "lora guidance pair": (distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--guidance-pair-weight", "1"),
                               "a LoRA student has no ω input"),
        "fixed guidance pair": (distill_args(tiny_sd, image_folder, out, "--guidance-scale-min", "4", "--guidance-scale-max", "4",
                                             "--guidance-pair-weight", "1"), "needs a guidance range"),
        "ε at zero terminal SNR": (distill_args(tmp_path / "zsnr", image_folder, out), "predicts ε on a zero-terminal-SNR schedule"),
        "ε student at zero terminal SNR": (distill_args(tmp_path / "zsnr", image_folder, out, "--student-prediction", "epsilon"),
                                           "the student would predict ε on a zero-terminal-SNR"),
        "pair steps without pair": (distill_args(tiny_sd, image_folder, out, "--guidance-pair-steps", "5"),
                                    "it needs --guidance-pair-weight > 0"),
        "omega lr scale 0": (distill_args(tiny_sd, image_folder, out, "--omega-lr-scale", "0"), "--omega-lr-scale must be above 0"),
        "lora omega lr scale": (distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--omega-lr-scale", "10"),
                                "a LoRA student has no ω input"),
        # the tiny preset sets both (32, 4): only a value given on the command line asks for something a LoRA cannot do
        "lora omega embedding": (distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--time-cond-proj-dim", "64"),
                                 "--time-cond-proj-dim sets the size of a full student's ω embedding; a LoRA student"),
        "lora omega response": (distill_args(tiny_sd, image_folder, out, "--adapter", "lora", "--omega-response-samples", "8"),
                                "a LoRA student (--adapter lora) has no ω input"),
    }
    if "zero terminal SNR" in case:
        shutil.copytree(tiny_sd, tmp_path / "zsnr")
        scheduler_file = tmp_path / "zsnr" / "scheduler" / "scheduler_config.json"
        prediction = "v_prediction" if case.startswith("ε student") else "epsilon"
        scheduler_file.write_text(json.dumps(json.loads(scheduler_file.read_text()) | {"rescale_betas_zero_snr": True,
                                                                                         "prediction_type": prediction}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("someone else's")
    if case == "resume differs":
        out.mkdir()
        saved = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(out)))
        (out / "config.json").write_text(json.dumps(saved.to_dict()))
    argv, message = cases[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_run_killed_before_its_final_omega_response_reports_it_on_resume(tiny_sd, image_folder, tmp_path):
    """The ω response comes after the final checkpoint: a run killed between the two, resumed, reports it once, as the
    uninterrupted run does (and one killed after it, before its export, does not report it twice)."""
    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, image_folder, out)) == 0
    (expected,) = read_metrics(out, "omega_response_999")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    shutil.rmtree(out / "lcm")  # killed after the final checkpoint: no export, no response yet
    (out / "metrics.jsonl").write_text("".join(line for line in lines if "omega_response_999" not in line))
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 0
    assert read_metrics(out, "omega_response_999") == [expected] and (out / "lcm" / "model_index.json").is_file()
    shutil.rmtree(out / "lcm")  # killed after the response, before the export
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 0
    assert read_metrics(out, "omega_response_999") == [expected] and (out / "lcm" / "model_index.json").is_file()
    # The export's guidance record carries the response the metrics hold, not a new one
    assert json.loads((out / "lcm" / "guidance.json").read_text())["omega_response"]["999"] == expected["omega_response_999"]


def test_a_run_killed_mid_export_leaves_no_model_folder_and_resume_exports_it_whole(tiny_sd, image_folder, tmp_path, monkeypatch):
    """The model is exported into a staging folder, its guidance record included, and renamed into the run folder: a kill
    before the record (the last file) leaves no `lcm/` that a demo or an evaluation would take as finished."""
    from latent_consistency.training import run_folder

    out = tmp_path / "run"

    def killed(*args):
        raise KeyboardInterrupt  # stands for the kill: nothing after it runs

    monkeypatch.setattr(run_folder, "write_record", killed)
    assert main(distill_args(tiny_sd, image_folder, out)) == 130
    assert not (out / "lcm").exists() and (out / "export.partial" / "lcm" / "model_index.json").is_file()
    monkeypatch.undo()
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 0
    assert (out / "lcm" / "guidance.json").is_file() and not (out / "export.partial").exists()
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 0  # a finished run resumed exports over its model
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "lcm", "metrics.jsonl", "samples", "sources.json"]


def test_a_run_that_stopped_before_its_first_step_can_be_started_again(tiny_sd, image_folder, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"")  # the only image: zero bytes
    (bad / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a red star"}\n')
    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, bad, out, "--steps", "2")) == 2
    assert "could be decoded" in capsys.readouterr().err and not out.exists()  # data without a usable sample: refused first
    # A run that stopped after writing its config.json and before its first step (killed while loading, say)
    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(bad), out=str(out), steps=2))
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    # --resume has nothing to continue with other data, and says how to start again
    assert main(distill_args(tiny_sd, image_folder, out, "--steps", "2", "--resume")) == 2
    assert "start it again without --resume" in capsys.readouterr().err
    assert main(distill_args(tiny_sd, image_folder, out, "--steps", "2")) == 0
    assert "starting it over" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["data"] == str(image_folder) and (out / "lcm").is_dir()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_a_folder_with_a_checkpoint_a_step_or_other_files_is_never_started_over(tiny_sd, image_folder, tmp_path):
    from latent_consistency.training.run_folder import prepare_run_folder

    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / "state.json").write_text("{}")
    with pytest.raises(UserError, match="is not empty"):
        prepare_run_folder(config, resume=False)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(UserError, match="is not empty"):
        prepare_run_folder(config, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # nothing removed
    (tmp_path / "model.safetensors").unlink()
    for made_by_a_step in ("metrics.jsonl", "ode_targets.pt"):  # a logged step; the bank of `--method ode`, minutes of work
        (tmp_path / made_by_a_step).write_text('{"step": 1, "loss": 0.5}\n')
        with pytest.raises(UserError, match="is not empty"):
            prepare_run_folder(config, resume=False)
        (tmp_path / made_by_a_step).unlink()
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "ode_targets.pt.tmp").write_bytes(b"half a bank")  # a bank write that was killed: no work to keep
    prepare_run_folder(config, resume=False)  # config.json and an empty metrics file: a run that never stepped
    assert not any(tmp_path.iterdir())


def one_line_error(capsys) -> str:
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_config_json_this_tool_did_not_write_is_never_removed(tiny_sd, tmp_path, capsys):
    """Only a config.json a run wrote in this folder (every field, as `to_dict` writes them) marks a run that stopped before
    its first step: the user's own, partial, of the other command, another run's or not JSON, is left alone."""
    from latent_consistency.training.config import FinetuneConfig
    from latent_consistency.training.run_folder import prepare_run_folder

    out = tmp_path / "myrun"
    out.mkdir()
    saved = out / "config.json"
    saved.write_text(json.dumps({"teacher": str(tiny_sd), "data": "nodata-here", "steps": 2}))
    assert main(["distill", "--preset", "tiny", "--config", str(saved), "--out", str(out)]) == 2
    assert "is not empty" in one_line_error(capsys) and json.loads(saved.read_text())["data"] == "nodata-here"
    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data="nodata-here", out=str(out)))
    theirs = {"partial": json.dumps({"teacher": str(tiny_sd), "steps": 2}),
              "the other command's": json.dumps(resolve_config(FinetuneConfig, "tiny", overrides=dict(out=str(out))).to_dict()),
              "another run's": json.dumps(resolve_config(DistillConfig, "tiny", overrides=dict(out=str(tmp_path / "old"))).to_dict()),
              "not JSON": "teacher: tiny-sd"}
    for kind, text in theirs.items():
        saved.write_text(text)
        with pytest.raises(UserError, match="is not empty"):
            prepare_run_folder(config, resume=False)
        assert saved.read_text() == text, kind
    saved.write_text(json.dumps(config.to_dict()))  # what a run writes: the folder is free again
    prepare_run_folder(config, resume=False)
    assert not any(out.iterdir())


def test_resuming_with_other_settings_offers_a_fresh_start_only_where_one_would_work(tiny_sd, image_folder, tmp_path):
    """A `--method ode` run stopped after its ODE bank, before a checkpoint: without --resume the folder is not free, so
    --resume with other settings says to resume with the same ones (the bank is reused) or use a new --out."""
    from latent_consistency.training.run_folder import prepare_run_folder

    def ode(**overrides):
        return resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path),
                                                                     method="ode", guidance_scale_min=1.0, **overrides))

    (tmp_path / "config.json").write_text(json.dumps(ode().to_dict()))
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "ode_targets.pt").write_bytes(b"minutes of teacher passes")
    with pytest.raises(UserError, match="is not empty"):
        prepare_run_folder(ode(lr=1e-3), resume=False)
    with pytest.raises(UserError) as refused:
        prepare_run_folder(ode(lr=1e-3), resume=True)
    message = str(refused.value)
    assert "resume with the same settings or use a new --out" in message and "ode_targets.pt" in message
    assert "without --resume" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "ode_targets.pt"]
    prepare_run_folder(ode(), resume=True)  # the same settings resume


@pytest.fixture(scope="module")
def finished_run(tiny_sd, image_folder, tmp_path_factory):
    """A finished 4-step tiny run that kept its checkpoints at steps 2 and 4; (its folder, the arguments it ran with)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = distill_args(tiny_sd, image_folder, out, "--keep-checkpoints", "10")
    assert main(args) == 0
    return out, args


def test_resume_drops_what_a_killed_run_logged_after_its_checkpoint(finished_run, tmp_path, monkeypatch):
    """Killed after logging step 3 (and half of step 4's line), before the step-4 checkpoint: the resumed run's
    metrics.jsonl reads as the uninterrupted run's, and TensorBoard is told to hide the events after step 2 (and is closed at
    the end, which writes its last events out)."""
    import types

    reference, args = finished_run
    out = tmp_path / "killed"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    shutil.rmtree(out / "lcm")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= 3) + '{"step": 4, "lo')
    opened, closed = [], []

    class SummaryWriter:  # TensorBoard is not installed here: a stand-in that records how it was opened and closed
        def __init__(self, log_dir, purge_step=None):
            opened.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):  # was never called: the last scalars stayed in the writer's buffer at exit
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    assert main([a if a != str(reference) else str(out) for a in args] + ["--resume"]) == 0

    def log(run):
        return [(m["step"], m.get("loss"), m.get("omega_response_999")) for m in read_metrics(run, "step")]

    assert log(out) == log(reference) and [step for step, *_ in log(out)] == [1, 2, 3, 4, 4]
    assert opened == [3] and closed == [True] and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(finished_run, capsys):
    reference, args = finished_run
    saved = (reference / "config.json").read_text()
    assert main(args + ["--steps", "2", "--resume"]) == 2
    assert "the checkpoint in" in (err := one_line_error(capsys)) and "at step 4; --steps must be at least 4" in err
    assert (reference / "config.json").read_text() == saved


@pytest.mark.parametrize("damage", ["garbage", "[1]", '{"objective": "x"}', b"\xff\xfe"])
def test_resuming_from_a_damaged_config_json_is_one_line(tiny_sd, image_folder, tmp_path, capsys, damage):
    saved = tmp_path / "config.json"
    saved.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    assert main(distill_args(tiny_sd, image_folder, tmp_path, "--resume")) == 2
    assert f"{saved} is not a run's config" in one_line_error(capsys)
    assert saved.read_bytes() == (damage if isinstance(damage, bytes) else damage.encode())


def test_the_omega_projection_gets_its_own_learning_rate(tiny_sd, image_folder, tmp_path):
    """--omega-lr-scale S: the ω projection (zero at the start) moves S times as far as at scale 1 in the first AdamW steps,
    where each weight moves by about the learning rate whatever its gradient's size; the other weights are unchanged."""
    from latent_consistency.training import loop

    moved = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"scale-{scale:g}"
        config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(out), steps=1,
                                                                       omega_lr_scale=scale, ema_decay=0.0))
        exported = loop.train(config, progress=False)
        weights = load_file(str(exported / "unet" / "diffusion_pytorch_model.safetensors"))
        moved[scale] = (weights["time_embedding.cond_proj.weight"].abs().mean().item(), weights["conv_in.weight"])
    assert moved[1.0][0] > 0 and moved[10.0][0] == pytest.approx(10 * moved[1.0][0], rel=0.05)
    torch.testing.assert_close(moved[10.0][1], moved[1.0][1])


def test_the_loop_gives_the_pair_loss_its_step(tiny_sd, image_folder, tmp_path, monkeypatch):
    """--guidance-pair-steps 2: the λ_Δ term weighs λ_Δ at steps 0 and 1 and nothing from step 2 on."""
    from latent_consistency import losses
    from latent_consistency.training import loop

    weights, call = [], losses.GuidancePairLCDLoss.__call__
    monkeypatch.setattr(losses.GuidancePairLCDLoss, "__call__", lambda self, *a, **k: weights.append(self.pair_weight) or call(self, *a, **k))
    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path / "run"),
                                                                   steps=3, guidance_pair_weight=5.0, guidance_pair_steps=2))
    loop.train(config, progress=False)
    assert weights == [5.0, 5.0, 0.0]


@pytest.fixture(scope="module")
def latent_cache(tiny_sd, image_folder, tmp_path_factory):
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.data.latent_cache import write_latent_cache
    from latent_consistency.models import load_diffusion_model

    model = load_diffusion_model(str(tiny_sd))
    out = tmp_path_factory.mktemp("cache") / "latents"
    return write_latent_cache(ImageFolderDataset(image_folder, 16), out, model.codec, model.prompts,
                              source={"dataset": "test images"}, progress=False)


def test_distill_from_latent_cache_with_accumulation(tiny_sd, latent_cache, tmp_path):
    out = tmp_path / "cached"
    assert main(distill_args(tiny_sd, latent_cache, out, "--grad-accumulation", "2", "--solver", "dpm")) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["data"][0]["sampler"]["index"] == 16  # 4 steps x 2 micro-batches x 2 samples


def test_a_resolution_that_a_latent_cache_does_not_have_is_refused(tiny_sd, latent_cache, tmp_path, capsys):
    """The cache holds 16 px images encoded once: --resolution 16 is its own, any other size cannot apply to it."""
    out = tmp_path / "other-size"
    assert main(distill_args(tiny_sd, latent_cache, out, "--resolution", "24")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resolution 24 does not apply to a latent cache" in err, err
    assert not (out / "checkpoints").exists()
    assert main(distill_args(tiny_sd, latent_cache, tmp_path / "same-size", "--resolution", "16", "--steps", "1")) == 0


def test_distill_from_webdataset_shards(tiny_sd, tmp_path):
    import io
    import tarfile

    shard = tmp_path / "00000.tar"
    rng = np.random.default_rng(1)
    with tarfile.open(shard, "w") as tar:
        for i in range(10):
            for name, data in ((f"{i:04d}.png", _png(rng)), (f"{i:04d}.txt", f"a blue ring {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards-run"
    assert main(distill_args(tiny_sd, shard, out)) == 0
    assert "shards" in json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())["data"][0]


def _png(rng) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_prediction_teacher_distils_and_loss_falls(tmp_path, image_folder, zero_terminal_snr):
    """A v-prediction teacher's student keeps v-prediction (exported LCMScheduler says so) and learns,
    on SD's schedule and on it rescaled to zero terminal SNR (which the export keeps)."""
    from tiny_models import save_tiny_sd

    teacher = save_tiny_sd(tmp_path / "v-teacher", prediction_type="v_prediction")
    scheduler_file = teacher / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps(json.loads(scheduler_file.read_text()) | {"rescale_betas_zero_snr": zero_terminal_snr}))
    out = tmp_path / "v-run"
    assert main(distill_args(teacher, image_folder, out, "--steps", "30", "--lr", "1e-3", "--loss", "l2",
                             "--log-every", "1", "--checkpoint-every", "0")) == 0
    losses = [m["loss"] for m in read_metrics(out)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    exported = json.loads((out / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["prediction_type"] == "v_prediction" and exported["rescale_betas_zero_snr"] == zero_terminal_snr


def test_latent_cache_that_does_not_fit_the_teacher(tiny_sd, latent_cache, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad-cache"
    import shutil

    shutil.copytree(latent_cache, bad)
    shard = bad / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["latents"] = tensors["latents"][:, :3].contiguous()
    save_file(tensors, str(shard))
    assert main(distill_args(tiny_sd, bad, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "3 latent channels but the model's UNet takes 4" in err and len(err.splitlines()) == 1


def test_a_teacher_with_500_training_timesteps(tmp_path, image_folder):
    """T = 500: the student is trained, validated and exported with original_inference_steps = T/k = 25 (not 1000/k),
    and every reader of the run (the exported pipeline, a re-made student config) agrees."""
    from latent_consistency.models import load_diffusion_model, load_lcm
    from latent_consistency.training.config import config_from_dict
    from latent_consistency.training.objectives import Distillation
    from tiny_models import save_tiny_sd

    teacher = save_tiny_sd(tmp_path / "t500", num_train_timesteps=500)
    out = tmp_path / "run"
    assert main(distill_args(teacher, image_folder, out, "--skip", "20")) == 0
    exported = json.loads((out / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["num_train_timesteps"] == 500 and exported["original_inference_steps"] == 25
    model = load_lcm(str(out / "lcm"))
    assert model.timesteps(4).tolist() == [499, 379, 259, 139]
    remade = Distillation.scheduler_config(config_from_dict(json.loads((out / "config.json").read_text())), load_diffusion_model(str(teacher)))
    assert all(exported[k] == v for k, v in remade.items())


def test_a_lora_student_keeps_its_frozen_base_in_half_precision(tiny_sd, image_folder, tmp_path):
    """Under mixed precision the LoRA student's frozen UNet runs in half precision, as the teacher does; its LoRA weights
    train and export in float32."""
    from latent_consistency.models import lcm_scheduler_config, load_diffusion_model
    from latent_consistency.training.students import make_student

    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path / "x"),
                                                                   adapter="lora", lora_rank=4, mixed_precision="bf16"))
    base = load_diffusion_model(str(tiny_sd))
    student = make_student(config, base, lcm_scheduler_config(base.scheduler_config, 20))
    dtypes = {name: p.dtype for name, p in student.unet.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert student.trainable_parameters() and all(p.dtype == torch.float32 for p in student.trainable_parameters())
    out = tmp_path / "bf16-lora"
    # a process of its own: accelerate keeps one mixed-precision setting per process, and other tests ran without one
    run = subprocess.run([sys.executable, "-m", "latent_consistency.cli", *distill_args(tiny_sd, image_folder, out, "--adapter", "lora",
                          "--lora-rank", "4", "--mixed-precision", "bf16")], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out))
    weights = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


def test_a_lora_student_shares_the_teacher_unet_which_runs_without_its_adapters(tiny_sd, image_folder, tmp_path):
    """New LoRA adapters go on the teacher's own UNet (one UNet in memory): the teacher, and the validation grid's
    starting model, still compute exactly what the UNet without adapters does, while the student's output moves."""
    import copy

    from latent_consistency.models import consistency_model, guided_teacher, lcm_scheduler_config, load_diffusion_model
    from latent_consistency.training.students import make_student

    config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(tmp_path / "x"),
                                                                   adapter="lora", lora_rank=4))
    base = load_diffusion_model(str(tiny_sd))
    pristine = copy.deepcopy(base.unet)
    scheduler_config = lcm_scheduler_config(base.scheduler_config, 20)
    assert make_student(config, base, scheduler_config).unet is not base.unet and not base.unet_carries_student  # base untouched
    student = make_student(config, base, scheduler_config, share_unet=True)
    assert student.unet is base.unet and base.unet_carries_student
    with torch.no_grad():
        for name, p in student.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output (lora_B starts at zero)
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([499, 259])
    cond, uncond = torch.randn(2, 16, 32), torch.zeros(2, 16, 32)
    with torch.no_grad():
        teacher = base.guided_teacher().guided_output(z, t, cond, uncond, 3.0)
        expected = guided_teacher(pristine, base.scheduler_config).guided_output(z, t, cond, uncond, 3.0)
        start = consistency_model(base.unet, scheduler_config, base.network())(z, t, cond, 0.0)
        expected_start = consistency_model(pristine, scheduler_config)(z, t, cond, 0.0)
        moved = student.consistency_model(student.unet)(z, t, cond, 0.0)
    assert torch.equal(teacher, expected) and torch.equal(start, expected_start)
    assert (moved - start).abs().max() > 1e-3, "the student's adapters changed nothing"
    assert all(layer.lora_A["default"].weight.requires_grad for layer in student.unet.modules() if hasattr(layer, "lora_A"))


def test_a_retried_step_draws_anew_and_an_unretried_one_as_before():
    """After a non-finite loss the step is retried with a new (n, ω, ε) draw (a draw that fails, such as a degenerate pair,

    would otherwise fail every retry); the first attempt's draw is the one every run made before retries existed."""
    import numpy as np

    from latent_consistency.training.loop import step_generator

    def first(g):
        return torch.rand(4, generator=g)

    legacy = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 0, 4, 0]).generate_state(1, np.uint64)[0] >> 1))
    assert torch.equal(first(step_generator(0, 0, 4, "cpu")), first(legacy))
    draws = [first(step_generator(0, 0, 4, "cpu", attempt=a)) for a in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[1], first(step_generator(0, 0, 4, "cpu", attempt=1)))
