"""How often a data folder's tree is walked: once each time a process opens it as data (`open_dataset`) and once per
`lcm evaluate`, whether it is the prompts and their reference images or the reference alone. At LAION's scale (12 million
files) a walk takes minutes, and every process of an 8-GPU run makes its own. Walks are counted as the folders listed
(`os.scandir`, which `os.walk` and `Path.glob` list with), on folders of a few hundred tiny files."""

import io
import json
import os
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.shards import ShardStream
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError
from test_evaluate_inputs import Linear

R = 16


def captioned_tree(root, folders: int = 3, per_folder: int = 100, decodable: bool = False):
    """`folders` subfolders of `per_folder` .png files each (empty ones: a scan decodes none; or `decodable` 8-pixel
    images), captioned by a metadata.jsonl at the root; the real paths of the tree's folders."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for d in range(folders):
            (root / str(d)).mkdir(parents=True)
            for i in range(per_folder):
                name = f"{d}/{i:04d}.png"
                if decodable:
                    Image.new("RGB", (8, 8), (40 * d, 2 * i, 0)).save(root / name)
                else:
                    (root / name).write_bytes(b"")
                f.write(json.dumps({"file_name": name, "text": f"a red star number {d} {i}"}) + "\n")
    return {os.path.realpath(root)} | {os.path.realpath(root / str(d)) for d in range(folders)}


def write_tar(path):
    """A shard of one captioned 8-pixel PNG."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, payload in (("k.png", png.getvalue()), ("k.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def test_an_image_folder_is_walked_once_as_data(tmp_path, listings):
    """It was walked twice and more: once to look for images, once for .tar shards, once by the image folder's own scan."""
    folders = captioned_tree(tmp_path)
    dataset = open_dataset(str(tmp_path), R)
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 300
    assert listings == Counter(dict.fromkeys(folders, 1))


def test_an_image_folder_opened_as_data_has_the_samples_and_fingerprints_it_had(tmp_path):
    """The scan takes the listing `open_dataset` made: the same samples, in order, and the digests checkpoints record."""
    captioned_tree(tmp_path, folders=2, per_folder=3, decodable=True)
    (tmp_path / "1" / "0001.png").unlink()  # named by metadata.jsonl, missing: skipped
    (tmp_path / "0" / "extra.png").write_bytes(b"")  # in no line: skipped, uncaptioned
    opened, scanned = open_dataset(str(tmp_path), R), ImageFolderDataset(tmp_path, R)
    assert list(opened.samples) == list(scanned.samples) and len(opened) == 5
    assert dict(opened.skipped.counts) == dict(scanned.skipped.counts) == {"missing_file": 1, "no_caption": 1}
    assert (opened.fingerprint(), opened.size_fingerprint()) == (scanned.fingerprint(), scanned.size_fingerprint())


def test_a_folder_of_shards_opens_as_shards_in_one_walk(tmp_path, listings):
    for name in ("00000.tar", "00001.tar", "part/00002.tar"):
        write_tar(tmp_path / name)
    (tmp_path / "00000.parquet").write_bytes(b"")  # img2dataset writes these beside the shards
    (tmp_path / "._00000.tar").write_bytes(b"")  # macOS's resource fork: hidden, no shard
    stream = open_dataset(str(tmp_path), R)
    assert isinstance(stream, ShardStream)
    assert stream.shards == [str(tmp_path / name) for name in ("00000.tar", "00001.tar", "part/00002.tar")]
    assert listings == Counter(dict.fromkeys({os.path.realpath(tmp_path), os.path.realpath(tmp_path / "part")}, 1))


@pytest.mark.parametrize("files, message", [
    (("a.png", "a.txt", "sub/00000.tar"), "holds both images and .tar shards"),
    (("a.heic", "b.heic"), r"no images .* \(it holds 2 .heic files"),
    (("00000.tar.gz", "00001.tar.gz"), r"0000\d.tar.gz is a compressed shard \(and 1 more\).*decompress"),
    (("notes.md",), "holds no images, .tar shards or manifest.json"),
])
def test_a_folder_of_no_data_is_refused_as_it_was_in_one_walk(files, message, tmp_path, listings):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"a caption" if name.endswith(".txt") else b"")
    with pytest.raises(UserError, match=message) as error:
        open_dataset(str(tmp_path), R)
    assert "\n" not in str(error.value)
    assert set(listings.values()) == {1}


@pytest.mark.parametrize("role", ["--prompts", "--reference"])
def test_lcm_evaluate_walks_its_image_folder_once(role, tiny_lcm, tmp_path, listings):
    """As the prompts (and so their reference images) the folder was scanned twice, for the captions and for the images;
    as --reference alone it was listed at its top for .tar shards, then walked."""
    from latent_consistency.cli import main

    data = tmp_path / "data"
    folders = captioned_tree(data, folders=2, per_folder=2, decodable=True)
    torch.jit.script(Linear()).save(str(tmp_path / "inception.pt"))
    (tmp_path / "prompts.txt").write_text("a red star\na blue ring\n")
    given = [role, str(data)] + (["--prompts", str(tmp_path / "prompts.txt")] if role == "--reference" else [])
    assert main(["evaluate", "--lcm", str(tiny_lcm), *given, "--inception", str(tmp_path / "inception.pt"), "--steps", "1",
                 "--samples", "2", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert (tmp_path / "out" / "results.json").is_file()
    assert {folder: listings[folder] for folder in folders} == dict.fromkeys(folders, 1)


def test_eval_fraction_walks_the_data_folder_once(tiny_sd, tmp_path, listings):
    """--eval-fraction opened --data once a side, walking the folder (and reading its captions) twice; its held-out side
    is now the other side of the training side's scan (`TrainingBatches.held_out`)."""
    from latent_consistency.models import load_diffusion_model
    from latent_consistency.training.config import DistillConfig
    from latent_consistency.training.loop import training_and_eval_batches

    folders = captioned_tree(tmp_path / "data", folders=2, per_folder=4, decodable=True)
    config = DistillConfig(data=str(tmp_path / "data"), eval_fraction=0.5)
    batches, held_out = training_and_eval_batches(config, load_diffusion_model(str(tiny_sd)), 2, 0, 1, "cpu")
    assert len(batches.dataset) + len(held_out.dataset) == 8 and held_out.sampler.world_size == 1
    assert {folder: listings[folder] for folder in folders} == dict.fromkeys(folders, 1)
