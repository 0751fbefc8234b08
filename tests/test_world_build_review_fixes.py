"""`lcm world build` after the review of 2026-12-07: a resume on another device, `--parts-from` given as a relative path, a
finished phase's outputs damaged or gone, `--dataset digits`, what a stop says, the latent cache's resume, and `lcm world
check`'s advice on an export. Every test starts from one tiny world of digits built by the command line (the module's
fixture); the phases a test does not look into are stubbed with that world's outputs, so each takes seconds."""

import functools
import json
import shutil

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.data import latent_cache
from latent_consistency.errors import UserError
from latent_consistency.training.checkpoint import list_checkpoints
from latent_consistency.world import build
from latent_consistency.world.build import PHASES, STATE_FILE, WORK_DIR, export_world, finished_phases, phase_outputs
from latent_consistency.world.fit import Checkpointer
from latent_consistency.world.presets import get_preset

pytestmark = pytest.mark.slow  # the fixture builds a tiny world (about 30 s)

PRESET = "tiny"
DIGITS = get_preset(PRESET)
NOTE = "note: digits is the world's own dataset, so it is left out of the tiny preset's pretraining datasets"


def _build(out, *options) -> list[str]:
    """`lcm world build` of the fixture's settings into `out`."""
    return ["world", "build", "--preset", PRESET, "--dataset", "digits", "--out", str(out), "--device", "cpu", "--no-progress", *options]


@pytest.fixture
def run(run_error):
    """`run_error` without the note every `--dataset digits` command prints first (checked once, in the first test)."""
    def run_without_note(argv):
        code, err = run_error(argv)
        return code, "\n".join(line for line in err.splitlines() if not line.startswith(NOTE))

    return run_without_note


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world of digits, built by `lcm world build --dataset digits` (refused before: digits is the preset's pretraining data)."""
    out = tmp_path_factory.mktemp("world") / "digits"
    assert main(_build(out)) == 0
    return out


def _copy(world, folder, done=PHASES):
    """A copy of `world` in `folder` whose build_state.json records only `done`: a build stopped in the phase after them."""
    shutil.copytree(world, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    (folder / STATE_FILE).write_text(json.dumps(state | {"done": list(done)}))
    return folder


def _stub_phases(monkeypatch, world, phases=PHASES) -> list[str]:
    """Each of `phases` made to stage `world`'s outputs of it instead of training; returns the phases run, in order."""
    ran = []

    def staged(self, stage, phase):
        ran.append(phase)
        for entry in phase_outputs(phase, self.preset):
            (stage / entry).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (world / entry).is_dir() else shutil.copy2)(world / entry, stage / entry)

    for phase in phases:
        monkeypatch.setattr(build._Build, phase, functools.partialmethod(staged, phase=phase))
    return ran


def _checkpoint(run_dir):
    """A checkpoint of a one-step phase on the CPU in `run_dir`; its folder."""
    module = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Checkpointer(run_dir, every=1).step(1, torch.tensor(0.5), {"unet": module}, optimizer, scheduler, torch.Generator())
    return list_checkpoints(run_dir)[-1], (module, optimizer, scheduler)


def _as_if_from_cuda(checkpoint, device="cuda"):
    """Emulate (no CUDA here) a checkpoint trained on CUDA: its recorded device, and a CUDA generator's 16-byte state."""
    state = json.loads((checkpoint / "state.json").read_text())
    (checkpoint / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "device"} | ({"device": device} if device else {})))
    torch.save({"state": torch.zeros(16, dtype=torch.uint8)}, checkpoint / "generator.pt")


def test_dataset_digits_builds_leaving_digits_out_of_the_pretraining_data(world, monkeypatch, run_error):
    spec = json.loads((world / "world.json").read_text())
    assert spec["preset"]["dataset"] == "digits" and spec["preset"]["pretraining_datasets"] == []
    assert finished_phases(world) == list(PHASES) and (world / "quality" / "quality.json").is_file()
    ran = _stub_phases(monkeypatch, world)
    code, err = run_error(_build(world))  # the same command again: the same spec, nothing to build
    assert code == 0 and ran == [] and err == NOTE


def test_build_state_records_the_device_of_each_phase(world):
    assert json.loads((world / STATE_FILE).read_text())["devices"] == dict.fromkeys(PHASES, "cpu")


def test_a_resume_on_another_device_is_refused_before_any_work(world, tmp_path, monkeypatch, run):
    copy = _copy(world, tmp_path / "world", PHASES[:5])  # stopped in the teacher phase ...
    checkpoint, _ = _checkpoint(copy / WORK_DIR / "teacher")
    assert json.loads((checkpoint / "state.json").read_text())["device"] == "cpu"
    _as_if_from_cuda(checkpoint)  # ... on a GPU, and resumed on the CPU (the review's `--device auto` on a node without it)
    ran = _stub_phases(monkeypatch, world)
    code, err = run(_build(copy))
    assert code == 2 and len(err.splitlines()) == 1 and ran == []
    assert "trained on cuda, and this run is on cpu" in err and "--device cuda" in err and f"remove {copy / WORK_DIR / 'teacher'}" in err


@pytest.mark.parametrize("recorded", ["cuda", None])  # None: a checkpoint of an earlier version, which records no device
def test_a_checkpoint_of_another_device_is_refused_in_one_line_where_it_is_resumed(tmp_path, recorded):
    checkpoint, (module, optimizer, scheduler) = _checkpoint(tmp_path / "run")
    _as_if_from_cuda(checkpoint, recorded)
    with pytest.raises(UserError, match=f"trained on {recorded or 'another type of device'}, not cpu"):
        Checkpointer(tmp_path / "run").resume({"unet": module}, optimizer, scheduler, torch.Generator())


def test_parts_from_given_as_a_relative_path_resumes_from_another_folder(world, tmp_path, monkeypatch, run):
    out = tmp_path / "variant"
    stop = iter([KeyboardInterrupt, UserError("the teacher phase was reached")])
    monkeypatch.setattr(build._Build, "teacher", lambda self, stage: (_ for _ in ()).throw(next(stop)))
    monkeypatch.chdir(world.parent)
    assert run(_build(out, "--v-prediction", "--parts-from", world.name))[0] == 130
    reused_from = json.loads((out / STATE_FILE).read_text())["reused_from"]
    assert reused_from == dict.fromkeys(PHASES[:5], str(world.resolve()))
    monkeypatch.chdir(tmp_path)  # the same command from another folder (a job script that cds), the world spelled otherwise
    code, err = run(_build(out, "--v-prediction", "--parts-from", str(world)))
    assert (code, err) == (2, "lcm world build: error: the teacher phase was reached")


def test_a_damaged_phase_output_is_refused_before_training_and_removing_it_rebuilds_it(world, tmp_path, monkeypatch, run):
    copy = _copy(world, tmp_path / "world", PHASES[:5])  # stopped in the teacher phase
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ran = _stub_phases(monkeypatch, world)
    code, err = run(_build(copy))
    assert code == 2 and len(err.splitlines()) == 1 and ran == []
    assert "cannot load the vae of" in err and f"remove {copy / 'vae'} and run the same command again" in err
    # The repair it names: the VAE is built again, and so is every phase that read the old one; a checkpoint of the stopped
    # teacher (trained on the old VAE's latents) is not resumed
    shutil.rmtree(copy / "vae")
    (copy / WORK_DIR / "teacher" / "checkpoints").mkdir(parents=True)
    code, err = run(_build(copy))
    assert code == 0 and ran == ["vae", "text_encoder", "latents", "teacher", "quality"]
    assert f"{copy / 'vae'} is missing: building the vae phase again" in err
    assert finished_phases(copy) == list(PHASES)


def test_a_finished_world_that_lost_a_part_builds_it_again(world, tmp_path, monkeypatch, run):
    copy = _copy(world, tmp_path / "world")
    shutil.rmtree(copy / "quality")
    ran = _stub_phases(monkeypatch, world)
    code, err = run(_build(copy))
    assert code == 0 and ran == ["quality"] and "quality is missing" in err
    state = json.loads((copy / STATE_FILE).read_text())
    assert state["done"] == list(PHASES) and set(state["seconds"]) == set(PHASES)


def test_a_stopped_build_says_that_the_same_command_resumes_it(world, tmp_path, monkeypatch, run):
    copy = _copy(world, tmp_path / "world", PHASES[:-1])
    monkeypatch.setattr(build._Build, "quality", lambda self, stage: (_ for _ in ()).throw(KeyboardInterrupt))
    code, err = run(_build(copy))
    assert code == 130 and err.startswith("lcm world build: interrupted (run the same command again to resume the build") and "\n" not in err


def test_the_latents_phase_resumes_from_its_last_whole_shard_to_the_same_cache(world, tmp_path, monkeypatch, encoded, run):
    # 32-image batches in 64-image shards: the tiny world's 256 images in four shards (the default preset's 50,000 make seven)
    monkeypatch.setattr(build, "write_latent_cache", functools.partial(latent_cache.write_latent_cache, batch_size=32, shard_size=64))
    _stub_phases(monkeypatch, world, ("teacher", "quality"))
    whole = _copy(world, tmp_path / "whole", PHASES[:4])
    assert run(_build(whole))[0] == 0
    stopped = _copy(world, tmp_path / "stopped", PHASES[:4])
    add_shard = latent_cache._Written.add_shard

    def stop_after_two(written, pending, batches):
        if len(written.shards) == 2:
            raise KeyboardInterrupt
        add_shard(written, pending, batches)

    monkeypatch.setattr(latent_cache._Written, "add_shard", stop_after_two)
    assert run(_build(stopped))[0] == 130
    monkeypatch.setattr(latent_cache._Written, "add_shard", add_shard)
    encoded[0] = 0
    code, err = run(_build(stopped))
    assert code == 0 and encoded[0] == DIGITS.train_size - 2 * 64 and "(2 shards written)" in err
    files = sorted(p.name for p in (whole / "latents").iterdir())
    assert files == sorted(p.name for p in (stopped / "latents").iterdir())
    assert all((whole / "latents" / f).read_bytes() == (stopped / "latents" / f).read_bytes() for f in files)
    # the manifest's source is the one a world has always recorded: no data key (the cache an earlier version wrote)
    source = json.loads((stopped / "latents" / latent_cache.MANIFEST).read_text())["source"]
    assert source == {"dataset": "digits", "split": "train", "resolution": DIGITS.resolution, "seed": DIGITS.seed, "size": DIGITS.train_size}


def test_check_of_an_export_that_lost_its_judge_says_to_export_it_again(world, tmp_path, run_error):
    export = export_world(world, tmp_path / "fp16")
    shutil.rmtree(export / "judge")
    code, err = run_error(["world", "check", "--world", str(export), "--out", str(tmp_path / "check"), "--device", "cpu", "--no-progress"])
    assert code == 2 and "exported world" in err and "lcm world export" in err and "lcm world build" not in err
