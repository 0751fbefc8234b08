"""A review of `lcm cache` and `lcm world` with inputs no other test gives: a cache's shard files on a shared disk, a disk
that fills while a cache is written, an --out of blanks or one that exists (known before the model loads), two `lcm world`
commands on one folder, an empty --parts-from, and a resumed build of other settings. Each was a defect; each is one line
on stderr, exit code 2, and nothing written lost."""

import errno
import json
import os
import stat

import pytest

import latent_consistency.models
from latent_consistency.data import latent_cache
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.folder_lock import hold
from latent_consistency.world.build import world_spec
from latent_consistency.world.presets import get_preset
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data") / "images", 3)


def cache_command(model, images, out):
    return ["cache", "--model", str(model), "--data", str(images), "--out", str(out), "--device", "cpu"]


def assert_one_line(code, err, message):
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


@pytest.fixture
def umask_022():
    """A umask of 022, which `outputs.permit_as_umask` reads afresh (it reads the process's once)."""
    from latent_consistency import outputs

    mask = os.umask(0o022)
    outputs._umask.cache_clear()
    yield
    os.umask(mask)
    outputs._umask.cache_clear()


def test_a_caches_shards_are_as_readable_as_its_other_files(tiny_sd, images, tmp_path, run_error, umask_022):
    """safetensors writes its files readable by their owner alone: a cache written on a team's disk had its manifest and
    captions readable by all (0644 under a umask of 022) and its shards by their writer only, so another user's run of it
    was refused. Now each file has the permissions the umask gives."""
    out = tmp_path / "cache"
    assert run_error(cache_command(tiny_sd, images, out))[0] == 0
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert "shard-00000.safetensors" in modes and set(modes.values()) == {0o644}, modes


def full_disk_at(monkeypatch, what: str) -> None:
    """A disk that fills while the shard (safetensors' error, which names no file) or the captions file (a write()'s
    OSError, which names none either) is written."""
    if what == "shard":
        def save_file(*args, **kwargs):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(latent_cache, "save_file", save_file)
    else:
        def write_captions(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(latent_cache, "_write_captions", write_captions)


@pytest.mark.parametrize(("what", "file"), [("shard", "shard-00000.safetensors"), ("captions", "captions.safetensors")])
def test_a_disk_that_fills_while_a_cache_is_written_names_the_file_and_a_rerun_finishes_it(tiny_sd, images, tmp_path, run_error,
                                                                                              monkeypatch, what, file):
    """Was "No space left on device while writing the output": which file of which folder, on which disk, unsaid."""
    out = tmp_path / "cache"
    with monkeypatch.context() as patch:
        full_disk_at(patch, what)
        code, err = run_error(cache_command(tiny_sd, images, out))
    last = err.splitlines()[-1]  # below the progress of the phase before, in the captions' case
    assert code == 2 and last == f"lcm cache: error: No space left on device: {tmp_path / 'cache.partial' / file}", err
    assert not out.exists()
    assert run_error(cache_command(tiny_sd, images, out))[0] == 0  # space freed: the same command finishes the cache
    assert len(LatentCache(out)) == 3


@pytest.mark.parametrize(("out", "message"), [
    ("", "--out '' names no folder"),  # was "latent cache folder . already exists; remove it or pick another folder"
    ("  ", "--out '  ' names no folder"),  # was a cache written into a folder named by two blanks
    ("{images}", "already exists"),
    ("{images}/0.png/cache", "0.png is not a folder"),
])
def test_an_out_that_names_no_new_folder_is_refused_before_the_model_loads(images, tmp_path, run_error, monkeypatch, out, message):
    """--out was checked after the model loaded and the data was scanned (SD and a large folder: minutes): a cache folder
    that exists, or none named, was refused only then, and a name of blanks made a folder of that name."""
    def load_diffusion_model(*args, **kwargs):
        raise AssertionError("the model loaded before --out was checked")

    for loader in ("load_diffusion_model", "load_latent_and_prompt_encoders", "load_latent_codec"):
        monkeypatch.setattr(latent_consistency.models, loader, load_diffusion_model)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_error(cache_command("no-model-needed", images, out.format(images=images)))
    assert_one_line(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_cache_renamed_whole_but_not_tidied_is_still_finished_by_a_rerun(tiny_sd, images, tmp_path, run_error):
    """The early check of --out lets through the one existing folder that `write_latent_cache` finishes: a whole cache whose
    writer was stopped between its rename and the removal of its progress record."""
    out = tmp_path / "cache"
    assert run_error(cache_command(tiny_sd, images, out))[0] == 0
    (out / latent_cache.PARTIAL_MARK).touch()
    assert run_error(cache_command(tiny_sd, images, out))[0] == 0
    assert not (out / latent_cache.PARTIAL_MARK).exists() and len(LatentCache(out)) == 3


@pytest.mark.parametrize("command", [
    ["build", "--preset", "tiny"],
    ["export", "--from", "{tmp}/world"],
    ["check", "--world", "{tmp}/world"],
    ["preview-decoder", "--world", "{tmp}/world"],
])
def test_a_second_world_command_on_a_held_folder_is_refused_and_changes_nothing(tmp_path, run_error, command):
    """`lcm world` took no lock on its --out: two builds into one folder trained the same phase into the same .work/ folder,
    each clearing or moving away the other's files, and the second stopped in a traceback ("No such file or directory:
    .../.work/quality/stage/quality/teacher_grid.png.tmp"); two exports or preview decoders shared one OUT.partial."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the first command's")
    argv = ["world", *[arg.format(tmp=tmp_path) for arg in command], "--out", str(out)]
    with hold(out):
        code, err = run_error(argv)
    assert_one_line(code, err, f"--out {out} is in use by another lcm command")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not (tmp_path / "out.partial").exists()


def test_a_dry_run_of_a_build_takes_no_lock(tmp_path, run_error, capsys):
    """It writes nothing: printing a build's settings while it runs is not refused."""
    out = tmp_path / "world"
    with hold(out):
        code, _ = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--dry-run"])
    assert code == 0 and not out.exists()


def test_an_empty_parts_from_is_refused_not_the_current_folder(tmp_path, run_error, monkeypatch):
    """`--parts-from ""` (an unset shell variable) was the current folder: "--parts-from . is not a world folder", and where
    the current folder was a world, its phases were copied."""
    monkeypatch.chdir(tmp_path)
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", "new", "--parts-from", "", "--device", "cpu"])
    assert_one_line(code, err, "argument --parts-from: is empty")
    assert not (tmp_path / "new").exists()


def test_a_resumed_build_of_other_settings_names_them(tmp_path, run_error):
    """A build resumed with --seed 3 was refused as one "built with other settings (preset 'tiny', epsilon)", the very
    preset and prediction type given: which setting differed was unsaid."""
    out = tmp_path / "world"
    out.mkdir()
    (out / "world.json").write_text(json.dumps(world_spec(get_preset("tiny"), "epsilon")))
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--seed", "3", "--v-prediction", "--device", "cpu"])
    assert_one_line(code, err, "seed 0, not 3; prediction_type 'epsilon', not 'v_prediction'")
    assert [p.name for p in out.iterdir()] == ["world.json"]


class Stop(Exception):
    """A kill of `lcm world preview-decoder` once its data is on disk, before its first checkpoint."""


def test_a_preview_decoder_stopped_and_run_again_is_the_one_an_unstopped_run_makes(tmp_path, monkeypatch):
    """The VAE gives channels-last latents and images: a run trained on those, a rerun on the contiguous ones it read back
    from its data file, and the convolutions came out apart in the last bits, so the rerun ended on other weights."""
    from latent_consistency.world import preview_decoder
    from latent_consistency.world.artifact import default_world_path
    from latent_consistency.world.preview_decoder import PreviewDecoderConfig, build_preview_decoder

    world, config = default_world_path(), PreviewDecoderConfig(channels=4, steps=3, images=8, batch_size=4, held_out=2)
    whole = build_preview_decoder(world, tmp_path / "whole", config, progress=False)

    def stopped(*args, **kwargs):
        raise Stop

    with monkeypatch.context() as patch, pytest.raises(Stop):
        patch.setattr(preview_decoder, "train_preview_decoder", stopped)
        build_preview_decoder(world, tmp_path / "again", config, progress=False)
    again = build_preview_decoder(world, tmp_path / "again", config, progress=False)
    weights = "diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (whole / weights).read_bytes()
