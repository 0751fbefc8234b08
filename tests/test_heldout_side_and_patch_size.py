"""--eval-fraction's held-out side taken from the training side's one walk and scan of an image folder
(`TrainingBatches.held_out`, `ImageFolderDataset.take_other_side`, `Holdout.split`); the one rule of a transformer's patch
size (`models.transformer_patch_size`); why the run summary's held-out line is the main process's record alone
(`TrainingBatches.skipped_record`)."""

import logging
from types import SimpleNamespace

import pytest
from PIL import Image

from latent_consistency import models
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError
from latent_consistency.models import DiffusionModel, load_diffusion_model, transformer_patch_size
from latent_consistency.training.batches import TrainingBatches, merged_skips
from test_folder_walks import captioned_tree

R, FRACTION = 16, 0.5


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


@pytest.fixture
def logged():
    """The messages logged by the data package from here on (a handler of its own: the suite runs with -p no:logging)."""
    records, logger = [], logging.getLogger("latent_consistency.data")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def names(part: str, n: int) -> list[str]:
    """The first `n` names "000.png", "001.png", ... on side `part` of a split of FRACTION."""
    side = Holdout(FRACTION, part)
    return [name for name in (f"{i:03d}.png" for i in range(1000)) if side.keeps(name)][:n]


def sidecar_folder(root, good: list[str], corrupt: list[str] = (), bad_caption: list[str] = ()):
    """Decodable captioned images `good`, captioned files that do not decode `corrupt`, decodable images whose .txt is not
    UTF-8 `bad_caption`."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([*good, *corrupt, *bad_caption]):
        if name in corrupt:
            (root / name).write_bytes(b"not an image")
        else:
            Image.new("RGB", (R, R), (20 * i % 256, 0, 0)).save(root / name)
        caption = b"\xff\xfe" if name in bad_caption else f"a red star {i}".encode()
        (root / name).with_suffix(".txt").write_bytes(caption)
    return root


def test_the_held_out_side_takes_the_training_sides_walk_and_scan(model, tmp_path, listings, logged):
    """--eval-fraction opened --data twice, once a side: the folder was walked twice and its captions read twice (at 12
    million files, minutes each). The held-out side is now the other side of the training side's scan, with the samples,
    skip counts and fingerprint that opening the folder for it gave, and without logging the scan's skips a second time."""
    folders = captioned_tree(tmp_path / "data", folders=2, per_folder=4, decodable=True)
    (tmp_path / "data" / "0" / "extra.png").write_bytes(b"")  # in no metadata line: skipped, uncaptioned
    spec = str(tmp_path / "data")
    training = TrainingBatches(spec, model, R, 2, seed=0, holdout=Holdout(FRACTION, "train"))
    logged.clear()
    held_out = training.held_out()
    assert {folder: listings[folder] for folder in folders} == dict.fromkeys(folders, 1)
    assert logged == []
    opened = open_dataset(spec, R, holdout=Holdout(FRACTION, "eval"))
    opened[0]  # as the held-out batches read their first sample (`TrainingBatches._check_usable`): an 8 px image, upscaled
    assert isinstance(held_out.dataset, ImageFolderDataset) and len(held_out.dataset) > 0
    assert list(held_out.dataset.samples) == list(opened.samples)
    assert dict(held_out.dataset.skipped.counts) == dict(opened.skipped.counts) == {"no_caption": 1, "converted_upscaled": 1}
    assert held_out.fingerprint() == opened.fingerprint()
    assert held_out.holdout == Holdout(FRACTION, "eval") and held_out.sampler.world_size == 1


def test_the_held_out_side_is_taken_once_and_an_empty_one_is_refused_as_before(model, tmp_path):
    """The training side gives its held-out samples away (a DataLoader worker of it carried them); a held-out side with no
    image is refused with the error that opening it gave."""
    spec = str(sidecar_folder(tmp_path / "one", names("train", 1)))
    training = TrainingBatches(spec, model, R, 1, seed=0, holdout=Holdout(0.1, "train"))
    with pytest.raises(UserError) as refused:
        training.dataset.take_other_side()
    with pytest.raises(UserError) as before:
        open_dataset(spec, R, holdout=Holdout(0.1, "eval"))
    assert str(refused.value) == str(before.value) and "leaves the eval split empty" in str(refused.value)
    with pytest.raises(ValueError, match="no other side to take"):
        training.dataset.take_other_side()


def test_a_split_hashes_each_name_once_into_both_sides():
    keys = [f"{i:03d}.png" for i in range(200)]
    side, other = Holdout(0.3, "train").split(keys, "images")
    assert side == Holdout(0.3, "train").select(keys, "images") and other == Holdout(0.3, "eval").select(keys, "images")
    assert Holdout(0.3, "train").other() == Holdout(0.3, "eval") and Holdout(0.3, "eval").other() == Holdout(0.3, "train")
    with pytest.raises(UserError, match=r"holding out 0.3 of 0 images leaves the train split empty"):
        Holdout(0.3, "train").split([], "images")


@pytest.mark.parametrize("config, patch", [({"patch_size": 2}, 2), ({"patch_size": None}, 1), ({}, 1), (None, 1)])
def test_a_transformers_patch_size_has_one_rule(config, patch, monkeypatch):
    """`lcm cache --resolution` read transformer/config.json's patch_size by a rule of its own beside the loaded model's:
    both answer from `transformer_patch_size`, which gives 1 for a config without one and for no transformer (a UNet)."""
    assert transformer_patch_size(config) == patch
    loaded = SimpleNamespace(is_transformer=config is not None, unet=SimpleNamespace(config=config))
    assert DiffusionModel.patch_size.fget(loaded) == patch
    monkeypatch.setattr(models, "transformer_patch_size", lambda config: 7)
    assert DiffusionModel.patch_size.fget(loaded) == 7


def test_every_process_reads_the_held_out_data_alike_and_the_main_one_furthest(model, tmp_path):
    """The run summary's held-out line is the main process's record: each process's held-out side (here two processes' of
    --eval-fraction) gives the same samples in the same order, and one that read less of it (not the main one, which reads
    on for the ω response) counted a part of what the main one did; merging them adds nothing."""
    spec = str(sidecar_folder(tmp_path / "data", names("train", 4) + names("eval", 10), corrupt=names("eval", 12)[10:],
                              bad_caption=names("eval", 13)[12:]))
    sides = [TrainingBatches(spec, model, R, 1, seed=3, rank=rank, world_size=2, holdout=Holdout(FRACTION, "train")).held_out()
             for rank in (0, 1)]
    main, other = sides
    assert list(main.dataset.samples) == list(other.dataset.samples)
    assert [(side.sampler.seed, side.sampler.rank, side.sampler.world_size) for side in sides] == [(3, 0, 1)] * 2
    for _ in range(12):  # the main process: the fixed held-out set, then on for the ω response (here: every sample)
        next(main)
    next(other)  # another process: the fixed held-out set alone
    main_record, other_record = main.skipped_record(), other.skipped_record()
    assert main_record[0] == {"bad_caption": 1, "corrupt": 2} and other_record[0] != main_record[0]
    assert set(map(tuple, other_record[1])) <= set(map(tuple, main_record[1]))
    assert all(other_record[0][reason] <= n for reason, n in main_record[0].items())
    assert dict(merged_skips([main_record, other_record]).counts) == main_record[0]
