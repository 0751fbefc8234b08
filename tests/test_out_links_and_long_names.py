"""An --out that is a symbolic link, or a long but valid name (`outputs.partial_folder`, `outputs.check_link`,
`folder_lock.lock_name`): `lcm world export` and `lcm world preview-decoder` write into the folder a link points to (they
wrote LINK.partial beside the link and failed to rename it onto the link, "Not a directory", leaving it there); a link to
nothing is refused at once, by every command, naming what it points to (it was "File exists" or "already exists"); a
name too long for OUT.partial is refused before anything loads (it was "File name too long" about OUT.partial, after
the work); and a folder whose `.NAME.lock` would be too long a name is locked all the same (it ran unguarded)."""

import functools
import json
import os
import re
import shutil

import pytest

from latent_consistency.cli import main
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold, lock_file
from latent_consistency.outputs import NAME_MAX, check_writable, writable_folder
from latent_consistency.world.artifact import default_world_path
from test_file_inputs import assert_one_line
from tiny_models import write_captioned_images

# The longest name whose OUT.partial is still a file name, and one byte more
LONGEST = "a" * (NAME_MAX - len(".partial"))
TOO_LONG = LONGEST + "b"


@pytest.fixture
def finished_world(tmp_path):
    """The shipped world (7 MB) as a build that `lcm world build` finished: what `lcm world export` copies."""
    from latent_consistency.world.build import PHASES, STATE_FILE

    world = shutil.copytree(default_world_path(), tmp_path / "world")
    (world / STATE_FILE).write_text(json.dumps({"done": list(PHASES), "seconds": {}, "device": "cpu"}))
    return world


@pytest.fixture
def small_preview(monkeypatch):
    """`lcm world preview-decoder` measured on 16 held-out images instead of the default's many; its command line for a
    run of two steps on 16 images of the shipped world."""
    from latent_consistency.world import preview_decoder

    monkeypatch.setattr(preview_decoder, "PreviewDecoderConfig", functools.partial(preview_decoder.PreviewDecoderConfig, held_out=16))
    return ["world", "preview-decoder", "--steps", "2", "--images", "16", "--device", "cpu", "--no-progress"]


def world_command(command, world, tmp_path):
    """`lcm world export` of `world`, or a one-step `lcm world preview-decoder` of it, without its --out."""
    if command == "export":
        return ["world", "export", "--from", str(world)]
    return ["world", "preview-decoder", "--world", str(world), "--steps", "1", "--images", "2", "--device", "cpu", "--no-progress"]


def listing(folder):
    """Every name under `folder`, links not followed."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- A link to an empty folder: written into that folder ------------------------------------------------------------------

def test_world_export_into_a_link_to_an_empty_folder_writes_that_folder(finished_world, tmp_path):
    target = tmp_path / "disk" / "fp16"
    target.mkdir(parents=True)
    link = tmp_path / "fp16"
    link.symlink_to(target, target_is_directory=True)
    assert main(["world", "export", "--from", str(finished_world), "--out", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target
    assert json.loads((target / "world.json").read_text())["weights_dtype"] == "float16"
    assert not (tmp_path / "fp16.partial").exists() and not (tmp_path / "disk" / "fp16.partial").exists()


def test_world_preview_decoder_into_a_link_to_an_empty_folder_writes_that_folder(small_preview, tmp_path):
    from latent_consistency.world.preview_decoder import QUALITY_FILE

    target = tmp_path / "disk" / "preview"
    target.mkdir(parents=True)
    link = tmp_path / "preview"
    link.symlink_to(target, target_is_directory=True)
    assert main(small_preview + ["--out", str(link)]) == 0
    assert link.is_symlink() and (target / QUALITY_FILE).is_file() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "preview"]
    assert [p.name for p in (tmp_path / "disk").iterdir()] == ["preview"]


# --- A link to nothing: refused at once, naming what it points to ---------------------------------------------------------

@pytest.mark.parametrize("command", ["export", "preview-decoder"])
def test_world_outputs_refuse_a_link_to_nothing(command, finished_world, tmp_path, run_error):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone" / "out")
    before = listing(tmp_path)
    code, err = run_error(world_command(command, finished_world, tmp_path) + ["--out", str(link)])
    assert_one_line(code, err, f"--out {link} is a symbolic link to {tmp_path / 'gone' / 'out'}, which does not exist")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["generate", "distill", "cache"])
def test_commands_writing_a_folder_refuse_a_link_to_nothing(command, tiny_sd, tiny_lcm, tmp_path, run_error):
    """Were: generate "cannot write to output folder X: File exists", distill "cannot write the run folder X: File exists",
    cache "latent cache folder X already exists"."""
    images = write_captioned_images(tmp_path / "images", 2)
    link = tmp_path / "out"
    link.symlink_to("gone")
    argv = {"generate": ["generate", "a red star", "--model", str(tiny_lcm)],
            "distill": ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--steps", "1"],
            "cache": ["cache", "--model", str(tiny_sd), "--data", str(images)]}[command]
    before = listing(tmp_path)
    code, err = run_error(argv + ["--out", str(link)])
    assert_one_line(code, err, f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist")
    assert listing(tmp_path) == before


def test_a_folder_inside_a_link_to_nothing_is_refused_naming_the_link(tmp_path):
    """Making the folder failed in the parent the link stands for: "File exists", naming neither."""
    (tmp_path / "runs").symlink_to(tmp_path / "gone")
    for check in (writable_folder, check_writable):
        message = f"--out {tmp_path}/runs/a is in {tmp_path}/runs, a symbolic link to {tmp_path}/gone, which does not exist"
        with pytest.raises(UserError, match=re.escape(message)):
            check(tmp_path / "runs" / "a", "--out")
    assert listing(tmp_path) == ["runs"]


# --- Names too long for OUT.partial: refused before anything loads --------------------------------------------------------

@pytest.mark.parametrize("name", [TOO_LONG, "é" * 124], ids=["248 bytes", "124 two-byte characters"])
@pytest.mark.parametrize("command", ["export", "preview-decoder", "cache"])
def test_a_name_too_long_for_out_partial_is_refused_before_anything_loads(command, name, finished_world, tiny_sd, tmp_path,
                                                                          run_error, monkeypatch):
    from latent_consistency.cli import cache
    from latent_consistency.world import build, preview_decoder

    for module, loader in ((cache, "load_encoders"), (preview_decoder, "load_world"), (build, "_check_exportable")):
        monkeypatch.setattr(module, loader, lambda *args: pytest.fail("loaded before --out was checked"))
    if command == "cache":
        argv = ["cache", "--model", str(tiny_sd), "--data", str(write_captioned_images(tmp_path / "images", 2))]
    else:
        argv = world_command(command, finished_world, tmp_path)
    before = listing(tmp_path)
    code, err = run_error(argv + ["--out", str(tmp_path / name)])
    assert_one_line(code, err, "its folder name is 248 bytes long; at most 247 (OUT.partial is written first)")
    assert listing(tmp_path) == before


def test_world_export_to_the_longest_name_is_written(finished_world, tmp_path):
    out = tmp_path / LONGEST
    assert main(["world", "export", "--from", str(finished_world), "--out", str(out)]) == 0
    assert json.loads((out / "world.json").read_text())["weights_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LONGEST, "world"])


# --- A lock for every name -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a" * 250, "a" * 255, "é" * 127], ids=["250 bytes", "255 bytes", "127 two-byte characters"])
def test_a_folder_with_a_long_name_is_locked(name, tmp_path):
    """`.NAME.lock` is over 255 bytes: its open failed and the command ran without the lock, beside a second one."""
    out = tmp_path / name
    lock = lock_file(out)
    assert len(os.fsencode(lock.name)) <= NAME_MAX and lock.name.startswith(".aaaa" if name[0] == "a" else ".éé")
    with hold(out):
        assert lock.is_file()
        with pytest.raises(UserError, match="is in use by another lcm command"), hold(tmp_path / ".." / tmp_path.name / name):
            pass
    assert not lock.exists()


def test_long_names_that_differ_only_at_their_end_have_locks_of_their_own(tmp_path):
    first, second = tmp_path / ("a" * 250), tmp_path / ("a" * 249 + "b")
    assert lock_file(first) != lock_file(second)
    with hold(first), hold(second):
        assert lock_file(first).is_file() and lock_file(second).is_file()


def test_an_ordinary_name_keeps_its_plain_lock_name(tmp_path):
    for name in ("run", "a" * 249):
        assert lock_file(tmp_path / name) == tmp_path / f".{name}.lock"
