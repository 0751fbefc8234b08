"""What an earlier version of `lcm` wrote, met by this one after an upgrade: a run folder stopped mid-run, an evaluation
folder stopped mid-way. Each either continues as the earlier version would have, or is refused in one line (exit 2)
saying what to do, with nothing already written lost; never a traceback, never a refusal that blames the user's data or
settings for what the upgrade changed. The earlier formats are built by hand here: the files and keys those versions
wrote, as found by running them (tests cannot run old commits)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_evaluate_inputs import Linear
from tiny_models import write_captioned_images

FIRST, RESUMED = ["--steps", "2"], ["--steps", "4", "--resume"]


def distill(teacher, data, out, *extra):
    return ["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(data), "--out", str(out), *extra]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def edit_checkpoint_state(out: Path, edit) -> None:
    """Apply `edit` to the state.json of the run's step-2 checkpoint, as the earlier version wrote it."""
    path = out / "checkpoints" / "step-0000002" / "state.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=1))


def size_fingerprint(images: Path) -> str:
    """The digest of an image folder that checkpoints recorded before the images' bytes were sampled: each sample's caption
    and file size, in the folder's order (metadata.jsonl's here)."""
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    return hashlib.sha256(json.dumps([(row["text"], (images / row["file_name"]).stat().st_size) for row in rows]).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def stopped_run(tiny_sd, tmp_path_factory):
    """Images and a full run of them stopped after its step-2 checkpoint (copy it before changing it)."""
    from latent_consistency.cli import main

    folder = tmp_path_factory.mktemp("upgrade")
    images = write_captioned_images(folder / "images", 8)
    assert main(distill(tiny_sd, images, folder / "run", *FIRST)) == 0
    return images, folder / "run"


def test_a_checkpoint_with_the_earlier_image_folder_fingerprint_resumes_as_the_current_one(stopped_run, tiny_sd, tmp_path, run_error):
    """A run stopped by the version whose checkpoints recorded an image folder's captions and file sizes, resumed after the
    upgrade on the same images. Was: refused as if the images had changed ('the data changed since this run's
    checkpoint'), so the run could not be finished at all."""
    images, run = stopped_run
    current, earlier = shutil.copytree(run, tmp_path / "current"), shutil.copytree(run, tmp_path / "earlier")
    edit_checkpoint_state(earlier, lambda state: state | {"data": [state["data"][0] | {"fingerprint": size_fingerprint(images)}]})
    for out in (current, earlier):
        code, err = run_error(distill(tiny_sd, images, out, *RESUMED))
        assert code == 0, err
    final = "checkpoints/step-0000004/student.safetensors"
    a, b = load_file(str(current / final)), load_file(str(earlier / final))
    assert all((a[k] == b[k]).all() for k in a)


def test_a_checkpoint_with_the_earlier_fingerprint_still_refuses_recaptioned_images(stopped_run, tiny_sd, tmp_path, run_error):
    """The earlier digest is accepted for what it checked: a caption changed since is still refused."""
    images, run = stopped_run
    images, out = shutil.copytree(images, tmp_path / "images"), shutil.copytree(run, tmp_path / "run")
    config = json.loads((out / "config.json").read_text()) | {"data": str(images)}  # a run of this copy of the images
    (out / "config.json").write_text(json.dumps(config, indent=1))
    edit_checkpoint_state(out, lambda state: state | {"config": config,
                                                      "data": [state["data"][0] | {"fingerprint": size_fingerprint(images)}]})
    metadata = images / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"a red star number 3"', '"a blue circle"'))
    code, err = run_error(distill(tiny_sd, images, out, *RESUMED))
    assert code == 2 and "changed since this run's checkpoint" in error_line(err)
    assert not (out / "checkpoints" / "step-0000004").exists()


def test_a_lora_run_with_the_earlier_presets_omega_embedding_size_resumes(tiny_sd, tmp_path, run_error):
    """A LoRA run of `--preset tiny` from before a preset's full-student settings were left out for LoRA recorded the
    preset's time_cond_proj_dim 32, which a LoRA never uses. Was: refused as 'started with a different config
    (time_cond_proj_dim: 32 -> 256)', and --time-cond-proj-dim 32 is refused for a LoRA: no command resumed it."""
    images = write_captioned_images(tmp_path / "images", 8)
    out = tmp_path / "run"
    assert run_error(distill(tiny_sd, images, out, "--adapter", "lora", *FIRST))[0] == 0
    config = json.loads((out / "config.json").read_text()) | {"time_cond_proj_dim": 32}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    edit_checkpoint_state(out, lambda state: state | {"config": state["config"] | {"time_cond_proj_dim": 32}})
    code, err = run_error(distill(tiny_sd, images, out, "--adapter", "lora", *RESUMED))
    assert code == 0, err
    assert (out / "checkpoints" / "step-0000004").is_dir() and (out / "lora").is_dir()


def test_a_lora_run_resumed_as_a_full_one_is_still_refused(tiny_sd):
    """Only a LoRA's unused full-student settings are left out of the comparison: another adapter is another run."""
    from latent_consistency.training.config import DistillConfig

    lora = DistillConfig(teacher=str(tiny_sd), data="d", out="o", adapter="lora", time_cond_proj_dim=32)
    assert lora.differences(DistillConfig(teacher=str(tiny_sd), data="d", out="o", adapter="lora")) == []
    assert any(d.startswith("adapter:") for d in lora.differences(DistillConfig(teacher=str(tiny_sd), data="d", out="o")))


def test_a_run_whose_preset_changed_since_names_its_config_json_to_resume_with(stopped_run, tiny_sd, tmp_path, run_error):
    """A preset's values change between versions (the world presets' optimizer became adamw-fused): the same --preset
    then resolves to another config. The refusal names the file that resumes the run with its own settings; with it the
    run resumes. Was: 'resume with the same settings', which the user believed they had given."""
    images, run = stopped_run
    out = shutil.copytree(run, tmp_path / "run")
    config = json.loads((out / "config.json").read_text()) | {"lr": 2e-4, "out": str(out)}  # the preset's lr when it started
    (out / "config.json").write_text(json.dumps(config, indent=1))
    edit_checkpoint_state(out, lambda state: state | {"config": config})
    code, err = run_error(distill(tiny_sd, images, out, *RESUMED))
    assert code == 2 and f"--config {out / 'config.json'} --out {out} --resume" in error_line(err)
    code, err = run_error(["distill", "--config", str(out / "config.json"), "--out", str(out), *RESUMED])
    assert code == 0, err
    assert json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())["config"]["lr"] == 2e-4


def test_an_evaluation_stopped_by_the_earlier_version_is_refused_as_such(tiny_lcm, tmp_path, run_error):
    """results.json of an evaluation stopped before models were named by absolute path: its fingerprint cannot match
    this version's. Was: 'holds the results of another evaluation (other models, prompts, ...)', blaming inputs that had
    not changed. Now one line that says why and what to do, and the file is kept."""
    (tmp_path / "prompts.txt").write_text("a red star\na blue ring\n")
    images = write_captioned_images(tmp_path / "images", 2)
    out = tmp_path / "eval"
    out.mkdir()
    row = {"sampler": "lcm", "steps": 1, "guidance_scale": 8.0, "method": "LCM", "network_evaluations": 1, "ms_per_image": 1.0,
           "peak_memory_mb": None, "images": 1, "inception_fid": 1.0}
    earlier = json.dumps({"fingerprint": "0123456789abcdef", "rows": {"lcm 1 8": row}})
    (out / "results.json").write_text(earlier)
    inception = tmp_path / "inception.pt"
    torch.jit.script(Linear()).save(str(inception))
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(tmp_path / "prompts.txt"), "--reference", str(images),
                           "--inception", str(inception), "--steps", "1", "--out", str(out), "--device", "cpu"])
    assert code == 2 and "earlier version of lcm evaluate" in error_line(err) and "--out" in error_line(err)
    assert (out / "results.json").read_text() == earlier
