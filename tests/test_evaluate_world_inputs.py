"""What a user hands `lcm evaluate` (and `evaluate sweep`) and `lcm world` that used to end in a traceback or lose a
world: seeds too large for the generators, a teacher on another schedule for --exact, a run's damaged config.json, an
--out with no folder name, a half-written preview-decoder cache, an exported world as a build's --out, a finished world
missing a part, a world.json whose preset sections are not objects. Each is one line on stderr and exit code 2, with
nothing of the user's changed."""

import json
import shutil

import pytest

from latent_consistency.world.artifact import default_world_path
from test_file_inputs import assert_one_line, snapshot


@pytest.fixture
def exported_world(tmp_path):
    """A copy of the shipped world: an export (fp16 weights, no build state)."""
    return shutil.copytree(default_world_path(), tmp_path / "exported")


@pytest.fixture
def finished_world(exported_world):
    """The shipped world as a build that `lcm world build` finished: what `lcm world export` copies."""
    from latent_consistency.world.build import PHASES, STATE_FILE

    (exported_world / STATE_FILE).write_text(json.dumps({"done": list(PHASES), "seconds": {}, "device": "cpu"}))
    return exported_world


@pytest.fixture
def image_folder(tmp_path):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path / "images", 4)


# --- lcm evaluate ---------------------------------------------------------------------------------------------------------

def test_evaluate_refuses_a_seed_past_the_generators_range(tiny_lcm, image_folder, tmp_path, run_error):
    """Image i starts from seed SEED+i; past 2^64 torch's generator raised an overflow traceback after the first rows."""
    out = tmp_path / "out"
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--steps", "1", "--clip", "x",
                           "--seed", str(10**20), "--out", str(out), "--device", "cpu"])
    assert_one_line(code, err, f"--seed {10**20} is too large")
    assert not out.exists()


def test_evaluate_exact_refuses_a_teacher_of_another_schedule(tiny_lcm, tiny_sd, image_folder, tmp_path, run_error):
    """--exact runs the teacher on the LCM's timesteps (up to 999): a teacher of 500 training timesteps was an IndexError."""
    teacher = shutil.copytree(tiny_sd, tmp_path / "teacher-500")
    config = teacher / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_train_timesteps": 500}))
    out = tmp_path / "out"
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--teacher", str(teacher), "--exact", "--prompts", str(image_folder),
                           "--steps", "1", "--clip", "x", "--out", str(out), "--device", "cpu"])
    assert_one_line(code, err, "has 500 training timesteps and the LCM 1000")
    assert not out.exists()


@pytest.mark.parametrize("config", [b"{not json", b"[1, 2]", b"\xff\xfe{}"])
def test_sweep_a_run_with_a_damaged_config_is_one_line(config, tmp_path, run_error, monkeypatch):
    from latent_consistency.world import artifact

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: object())
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(config)
    code, err = run_error(["evaluate", "sweep", "--runs", str(run), "--out", str(tmp_path / "sweep"), "--samples", "2", "--device", "cpu"])
    assert_one_line(code, err, f"{run / 'config.json'} is not a run's config")
    assert (run / "config.json").read_bytes() == config


@pytest.mark.parametrize("cache", ['["not", "ours"]', '{"settings": {}, "rows": []}'])
def test_sweep_cache_of_another_shape_is_scored_again(cache, tmp_path):
    """over_training.cache.json that is not an object of rows: its rows are made again (was an AttributeError)."""
    from latent_consistency.world.over_training import _read_cache

    (tmp_path / "cache.json").write_text(cache)
    assert _read_cache(tmp_path / "cache.json", {}) == {}


# --- lcm world ------------------------------------------------------------------------------------------------------------

def test_world_build_refuses_a_seed_its_phases_cannot_use(tmp_path, run_error):
    """Each phase seeds torch with SEED·1000 + its index; a larger --seed passed --dry-run, then a real build wrote world.json
    and died in an overflow traceback."""
    out = tmp_path / "world"
    for extra in (["--dry-run"], ["--device", "cpu", "--no-progress"]):
        code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--seed", str(10**20), *extra])
        assert_one_line(code, err, f"seed {10**20} is too large")
    assert not out.exists()


def test_world_build_does_not_rebuild_an_exported_world(exported_world, tmp_path, run_error, monkeypatch):
    """An export has world.json of the same settings but no build state: a build into it trained every phase again and
    replaced its parts one by one."""
    from latent_consistency.world import build

    def rendering(self):
        pytest.fail("the build started training into the exported world")

    monkeypatch.setattr(build._Build, "images", property(rendering))
    monkeypatch.setattr(build._Build, "pretraining_images", property(rendering))
    before = snapshot(exported_world)
    code, err = run_error(["world", "build", "--preset", "default", "--out", str(exported_world), "--device", "cpu", "--no-progress"])
    assert_one_line(code, err, "is an exported world (float16 weights)")
    assert snapshot(exported_world) == before


@pytest.mark.parametrize("flag", ["--out", "--parts-from"])
def test_world_json_with_a_preset_section_that_is_not_an_object(flag, tmp_path, run_error):
    world = tmp_path / "other"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"preset": {"name": "mine", "vae": 5}}))
    argv = ["--out", str(world)] if flag == "--out" else ["--out", str(tmp_path / "new"), "--parts-from", str(world)]
    code, err = run_error(["world", "build", "--preset", "tiny", *argv, "--device", "cpu", "--no-progress"])
    assert_one_line(code, err, "built with other settings" if flag == "--out" else "no phase of that world")
    assert (world / "world.json").read_text() == json.dumps({"preset": {"name": "mine", "vae": 5}})


def test_world_export_of_a_finished_world_missing_a_part(finished_world, tmp_path, run_error):
    """A part of a finished build removed: the copy died in a FileNotFoundError traceback and left OUT.partial behind."""
    shutil.rmtree(finished_world / "quality")
    out = tmp_path / "fp16"
    code, err = run_error(["world", "export", "--from", str(finished_world), "--out", str(out)])
    assert_one_line(code, err, "lacks quality")
    assert not out.exists() and not (tmp_path / "fp16.partial").exists()


@pytest.mark.parametrize("out", ["", ".", "sub/.."])
@pytest.mark.parametrize("command", ["export", "preview-decoder"])
def test_world_outputs_need_a_folder_name(command, out, finished_world, tmp_path, run_error, monkeypatch):
    """OUT.partial is named after --out: an --out of the (empty) current folder has no name to give it (a ValueError)."""
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    monkeypatch.chdir(here)
    source = ["--from", str(finished_world)] if command == "export" else ["--world", str(finished_world), "--steps", "1"]
    code, err = run_error(["world", command, *source, "--out", out])
    assert_one_line(code, err, "names no new folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "here"]
    assert [p.name for p in here.iterdir()] == ["sub"]


@pytest.fixture
def preview_partial(tmp_path):
    """An unfinished `lcm world preview-decoder --steps 1 --images 2` of the shipped world: its settings and a data file
    cut short when the run was killed."""
    from latent_consistency.world.preview_decoder import DATA_FILE, PreviewDecoderConfig, run_settings

    partial = tmp_path / "preview.partial"
    partial.mkdir()
    settings = run_settings(default_world_path(), PreviewDecoderConfig(steps=1, images=2))
    (partial / "settings.json").write_text(json.dumps(settings))
    (partial / DATA_FILE).write_bytes(b"\x10\x00\x00")
    return partial


def test_preview_decoder_resumes_past_a_data_file_cut_short(preview_partial, tmp_path, run_error, monkeypatch):
    from latent_consistency.world import preview_decoder

    monkeypatch.setattr(preview_decoder, "preview_quality", lambda *a, **k: {"psnr_preview_vs_vae": 0.0})
    out = tmp_path / "preview"
    code, err = run_error(["world", "preview-decoder", "--world", str(default_world_path()), "--out", str(out), "--steps", "1",
                           "--images", "2", "--device", "cpu", "--no-progress"])
    assert code == 0, err
    assert (out / "config.json").is_file() and not preview_partial.exists()


def test_preview_decoder_keeps_a_partial_whose_settings_are_not_json(preview_partial, tmp_path, run_error):
    (preview_partial / "settings.json").write_text("{cut short")
    before = snapshot(preview_partial)
    code, err = run_error(["world", "preview-decoder", "--world", str(default_world_path()), "--out", str(tmp_path / "preview"),
                           "--steps", "1", "--images", "2", "--device", "cpu", "--no-progress"])
    assert_one_line(code, err, "holds an unfinished preview decoder of other settings")
    assert snapshot(preview_partial) == before
