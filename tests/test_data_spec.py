"""`open_dataset`: which dataset each form of data spec opens, and the errors for the rest."""

import io
import sys
import tarfile
import types

import pytest
from PIL import Image

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.shards import ShardStream
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError

R = 8


def png(path):
    Image.new("RGB", (R, R)).save(path)


def tar(path):
    data = io.BytesIO()
    Image.new("RGB", (R, R)).save(data, "PNG")
    with tarfile.open(path, "w") as archive:
        for name, payload in (("k.png", data.getvalue()), ("k.txt", b"caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def fake_module(monkeypatch, name, **attributes):
    """Stand in for a module other engineers own, recording how it is called."""
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_world_datasets():
    """`world:NAME` is the training split of the built-in world's dataset, once the world has registered it."""
    import latent_consistency.world  # noqa: F401 (registers the world:NAME specs)
    from latent_consistency.world.shapes import ShapesDataset

    data = open_dataset("world:shapes", 32)
    assert isinstance(data, ShapesDataset) and data.split == "train" and data.resolution == 32
    with pytest.raises(UserError, match="unknown dataset 'faces'"):
        open_dataset("world:faces", 32)


def test_latent_cache_folder(monkeypatch, tmp_path):
    fake_module(monkeypatch, "latent_consistency.data.latent_cache", LatentCache=lambda path, holdout=None: ("cache", path))
    (tmp_path / "manifest.json").write_text("{}")
    png(tmp_path / "preview.png")  # a manifest wins over images beside it
    assert open_dataset(str(tmp_path), R) == ("cache", tmp_path)


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    png(tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "a.txt").write_text("caption")
    dataset = open_dataset(str(tmp_path), R)
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 1


def test_shard_forms(tmp_path):
    for name in ("00000.tar", "00001.tar"):
        tar(tmp_path / name)
    (tmp_path / "00000.parquet").write_bytes(b"")  # img2dataset writes these beside the shards
    (tmp_path / "00000_stats.json").write_text("{}")
    for spec, count in [
        (str(tmp_path), 2),
        (str(tmp_path / "00001.tar"), 1),
        (str(tmp_path / "{00000..00001}.tar"), 2),
        (str(tmp_path / "*.tar"), 2),
    ]:
        stream = open_dataset(spec, R, seed=4, rank=0, world_size=1)
        assert isinstance(stream, ShardStream) and len(stream.shards) == count and stream.seed == 4
    assert len(open_dataset(str(tmp_path), R, rank=1, world_size=2).shards) == 1


def test_errors_name_the_accepted_forms(tmp_path):
    import latent_consistency.world  # noqa: F401 (registers the world:NAME specs)

    with pytest.raises(UserError, match="cannot read data spec.*world:shapes.*brace pattern"):
        open_dataset(str(tmp_path / "missing"), R)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="cannot read data spec"):
        open_dataset(str(tmp_path / "notes.txt"), R)
    with pytest.raises(UserError, match="holds no images, .tar shards or manifest.json"):
        open_dataset(str(tmp_path), R)
    png(tmp_path / "a.png")
    tar(tmp_path / "a.tar")
    with pytest.raises(UserError, match="both images and .tar shards"):
        open_dataset(str(tmp_path), R)
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(str(tmp_path / "{0..1}.tar"), R)


@pytest.mark.parametrize("spec", ["", "  "])
def test_a_blank_spec_is_not_the_current_folder(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    png(tmp_path / "a.png")  # was: the current folder read as the data
    with pytest.raises(UserError, match="names no data"):
        open_dataset(spec, R)


def test_held_out_split_is_by_file_disjoint_and_stable(tmp_path):
    """Each image file lands on one side by its name alone: the sides are disjoint, cover the folder, are the same on
    every call, and adding files never moves an existing file to the other side."""
    from latent_consistency.data.holdout import Holdout

    for i in range(60):
        png(tmp_path / f"{i:03d}.png")
        (tmp_path / f"{i:03d}.txt").write_text(f"caption {i}")

    def files(part):
        return {name for name, _ in open_dataset(str(tmp_path), R, holdout=Holdout(0.2, part)).samples}

    train, held = files("train"), files("eval")
    assert not train & held and len(train | held) == 60 and 3 <= len(held) <= 25
    assert files("eval") == held
    for i in range(60, 90):
        png(tmp_path / f"{i:03d}.png")
        (tmp_path / f"{i:03d}.txt").write_text(f"caption {i}")
    assert files("eval") >= held and files("train") >= train


def test_a_file_name_that_is_not_utf8_is_held_out_by_its_bytes(tmp_path):
    """A folder with a file name that is not UTF-8 (Latin-1 from an old camera, a zip of another system) stopped --eval-fraction
    with a UnicodeEncodeError traceback; it is hashed as its bytes, and every other name as before."""
    import hashlib
    import os

    from latent_consistency.data.holdout import Holdout

    names = [os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"\xff.png")] + [f"{i}.png" for i in range(8)]
    for name in names:
        png(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("a cat")
    sides = [{name for name, _ in open_dataset(str(tmp_path), R, holdout=Holdout(0.5, part)).samples} for part in ("train", "eval")]
    assert not sides[0] & sides[1] and sides[0] | sides[1] == set(names)
    held = {name for name in names if int.from_bytes(hashlib.sha256(os.fsencode(name)).digest()[:8], "big") / 2**64 < 0.5}
    assert sides[1] == held


def test_held_out_split_of_shards_and_named_datasets(tmp_path):
    import latent_consistency.world  # noqa: F401 (registers the world:NAME specs)
    from latent_consistency.data.holdout import Holdout

    for i in range(12):
        tar(tmp_path / f"{i:05d}.tar")
    shards = {part: set(open_dataset(str(tmp_path), R, holdout=Holdout(0.25, part)).shards) for part in ("train", "eval")}
    assert not shards["train"] & shards["eval"] and len(shards["train"] | shards["eval"]) == 12 and shards["eval"]
    digits = {part: open_dataset("world:digits", 32, holdout=Holdout(0.1, part)) for part in ("train", "eval")}
    assert len(digits["train"]) + len(digits["eval"]) == len(open_dataset("world:digits", 32))
    assert not set(digits["train"].indices) & set(digits["eval"].indices)
    with pytest.raises(UserError, match="leaves the eval split empty"):
        open_dataset(str(tmp_path / "00000.tar"), R, holdout=Holdout(0.01, "eval"))


def test_only_the_first_process_logs_an_image_folders_scan(tmp_path, caplog):
    # was: a bad caption logged once per process of a multi-process run (each scans the same folder): 8 times on 8 GPUs
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a red one")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    logged = {}
    for rank in (0, 1):
        caplog.clear()
        with caplog.at_level("INFO", logger="latent_consistency.data"):
            dataset = open_dataset(str(tmp_path), R, rank=rank, world_size=2)
        logged[rank] = [r.getMessage() for r in caplog.records]
        assert sum(dataset.skipped.counts.values()) == 1  # counted on every process: the run's summary merges them
    assert len(logged[0]) == 1 and "bad_caption" in logged[0][0] and logged[1] == []

