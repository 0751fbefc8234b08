"""Every model file lcm writes ends with the permissions the umask gives (`outputs.permit_as_umask`): safetensors 0.8 writes
its files 0o600 whatever the umask, which left a team's exports, checkpoints and world weights unreadable to its other
users while the JSON beside them was not. Also: `lcm world preview-decoder` refuses an absurd --channels in one line, a
world dataset refused at a model's size says whose size it is, and one process's shards are not named by a rank."""

import io
import json
import os
import stat
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latent_consistency import outputs
from latent_consistency.cli import main
from latent_consistency.errors import UserError


@pytest.fixture(params=[0o022, 0o077], ids=["umask 022", "umask 077"])
def umask(request):
    """The process's umask set to the parameter (077: the user asks for owner-only files, which must stay so), with the
    umask `outputs` read once for the process forgotten before and after."""
    previous = os.umask(request.param)
    outputs._umask.cache_clear()
    yield request.param
    os.umask(previous)
    outputs._umask.cache_clear()


def modes(root):
    """{path relative to `root`: permission bits} of `root` and of every file and folder under it."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def assert_as_umask(root, mask, top=True):
    """Every file under `root` is 0o666 less `mask`, every folder 0o777 less it (`root` itself too, unless `top` is False:
    a folder the test made, not the command)."""
    bad = {path: oct(mode) for path, mode in modes(root).items()
           if (top or path != ".") and mode != (0o777 if os.path.isdir(os.path.join(root, path)) else 0o666) & ~mask}
    assert not bad, f"not as umask {oct(mask)}: {bad}"


def test_permit_as_umask_sets_files_and_folders_and_leaves_links_and_the_group_bit(umask, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tree / "sub" / "model.safetensors"))
    assert stat.S_IMODE(os.stat(tree / "sub" / "model.safetensors").st_mode) == 0o600  # safetensors' own, the defect
    os.chmod(tree / "sub", 0o700)  # as shutil.copytree copies another user's folder
    os.chmod(tree, 0o2700)  # a team's folder whose group what is made in it takes
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.chmod(outside, 0o600)
    (tree / "link").symlink_to(outside)
    assert outputs.permit_as_umask(tree) == tree
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o600, "a link was followed out of the output"
    assert stat.S_IMODE(os.stat(tree).st_mode) == stat.S_ISGID | (0o777 & ~umask)
    assert modes(tree)["sub"] == 0o777 & ~umask and modes(tree)["sub/model.safetensors"] == 0o666 & ~umask
    single = tmp_path / "single.safetensors"
    save_file({"w": torch.zeros(2)}, str(single))
    outputs.permit_as_umask(single)
    assert stat.S_IMODE(os.stat(single).st_mode) == 0o666 & ~umask


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_distill_exports_and_checkpoints_are_as_the_umask_says(umask, adapter, tiny_sd, image_folder, tmp_path):
    """`lcm distill`'s checkpoints (`training.checkpoint`) and its export, a full LCM pipeline or a LoRA
    (`training.students.Student.export`)."""
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder), "--out", str(out),
            "--omega-response-samples", "0", "--adapter", adapter]
    assert main(argv) == 0
    export = out / ("lcm" if adapter == "full" else "lora")
    assert any(export.rglob("*.safetensors")) and any((out / "checkpoints").rglob("*.safetensors"))
    assert_as_umask(export, umask)
    assert_as_umask(out / "checkpoints", umask)


def _stub_phase(phase):
    """A world build phase that writes each of its outputs as a safetensors file (0o600, as safetensors writes it) or,
    for a folder, one inside it."""
    from latent_consistency.world.build import phase_outputs

    def run(self, stage):
        for entry in phase_outputs(phase, self.preset):
            path = stage / entry if entry.endswith(".json") else stage / entry / "model.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"w": torch.zeros(2)}, str(path))

    return run


def test_world_build_export_and_reused_parts_are_as_the_umask_says(umask, tmp_path, monkeypatch):
    """`lcm world build` (each phase's outputs, renamed into the world), `lcm world export` (copied and cast) and a build's
    --parts-from (copied from a world of other permissions), with every phase's training stubbed by a safetensors write."""
    from latent_consistency.world import build

    for phase in build.PHASES:
        monkeypatch.setattr(build._Build, phase, _stub_phase(phase))
    monkeypatch.setattr(build, "_load_outputs", lambda *args: None)  # the stubs' outputs are no models to check
    world = build.build_world("tiny", tmp_path / "world", device="cpu", progress=False)
    assert_as_umask(world, umask, top=False)
    os.chmod(world / "vae", 0o700)  # another user's world, say, read by this one: the copies must not keep its modes
    exported = build.export_world(world, tmp_path / "export")
    assert_as_umask(exported, umask, top=False)
    monkeypatch.setattr(build, "PHASES", build.PHASES[:3])  # tokenizer, judge and vae: reused, and nothing else to build
    reused = build.build_world("tiny", tmp_path / "reused", device="cpu", progress=False, parts_from=world)
    assert json.loads((reused / build.STATE_FILE).read_text())["reused_from"]
    assert_as_umask(reused, umask, top=False)


@pytest.mark.slow
def test_preview_decoder_is_as_the_umask_says(umask, tmp_path):
    from latent_consistency.world.artifact import default_world_path
    from latent_consistency.world.preview_decoder import PreviewDecoderConfig, build_preview_decoder

    config = PreviewDecoderConfig(channels=4, steps=1, images=8, batch_size=4, held_out=2)
    out = build_preview_decoder(default_world_path(), tmp_path / "preview", config, device="cpu", progress=False)
    assert any(out.glob("*.safetensors"))
    assert_as_umask(out, umask)


def test_preview_decoder_refuses_absurd_channels_in_one_line_before_allocating(run_error, tmp_path):
    """--channels 100000 ended in the allocator's traceback (~10^11 weights); the widest allowed still builds."""
    from latent_consistency.world.preview_decoder import MAX_CHANNELS, PreviewDecoderConfig, check_config, make_preview_decoder

    for channels in (100000, MAX_CHANNELS + 1):
        code, err = run_error(["world", "preview-decoder", "--channels", str(channels), "--out", str(tmp_path / "preview")])
        assert code == 2 and len(err.splitlines()) == 1 and f"--channels {channels}" in err and f"at most {MAX_CHANNELS}" in err, err
        assert "Traceback" not in err and not (tmp_path / "preview").exists() and not (tmp_path / "preview.partial").exists()
    with pytest.raises(UserError, match="--channels 0"):
        check_config(PreviewDecoderConfig(channels=0))
    for channels in (1, PreviewDecoderConfig.channels, MAX_CHANNELS):
        config = PreviewDecoderConfig(channels=channels)
        check_config(config)
        assert make_preview_decoder(4, 4, config).config.decoder_block_out_channels[0] == channels


def test_a_world_dataset_refused_at_a_size_it_was_not_given_says_where_the_size_came_from():
    """`lcm cache --data world:shapes` with a 16 px model said "resolution 16 is not supported": a number the user never
    gave. Where the size is the model's, the refusal says so; a size the user gave is refused as before."""
    from latent_consistency.world.datasets import get_dataset

    with pytest.raises(UserError) as refused:
        get_dataset("shapes", "train", 16, size_from="the native size of --model runs/tiny")
    message = str(refused.value)
    assert "16 px, the native size of --model runs/tiny" in message and "32 or 64 px" in message and "\n" not in message
    with pytest.raises(UserError, match="^resolution 24 is not supported; use one of 32, 64$"):
        get_dataset("shapes", "train", 24)
    assert len(get_dataset("shapes", "train", 32, size=2, size_from="the native size of --model runs/tiny")) == 2


def _tar(path):
    """A webdataset shard of one captioned image."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, "PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("0.png", png.getvalue()), ("0.txt", b"a red star")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return str(path)


def test_shards_are_named_by_rank_only_where_there_are_ranks(tmp_path):
    """One process logged its skips as "shards of rank 0/1 (...)", ranks where there are none."""
    from latent_consistency.data.shards import ShardStream

    shards = [_tar(tmp_path / f"{i:05d}.tar") for i in range(2)]
    assert ShardStream(shards, 16).skipped.name == f"shards ({shards[0]}, ...)"
    assert ShardStream(shards, 16, rank=1, world_size=2).skipped.name == f"shards of rank 1/2 ({shards[1]}, ...)"
