"""Images at the edges of what users bring: a shard whose download was cut off at any byte, photos between Pillow's
pixel limit and twice it, and float and 32-bit integer images (a float TIFF)."""

import io
import itertools
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import decode_rgb_reasons
from latent_consistency.data.shards import ShardStream
from test_shard_journeys import write_shard

R = 8


def noise_png(k: int) -> bytes:
    """An image unlike every other sample's, of a size of its own (so member sizes and offsets differ)."""
    pixels = np.random.default_rng(k).integers(0, 256, (R + k, R + 3 * k, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "PNG")
    return data.getvalue()


LAYOUTS = {  # a sample's members in tar order, as different writers order them
    "image first": lambda image, caption: [("png", image), ("txt", caption.encode())],
    "caption first": lambda image, caption: [("txt", caption.encode()), ("png", image)],
    "json caption": lambda image, caption: [("png", image), ("json", f'{{"caption": "{caption}", "url": "x"}}'.encode())],
}


def cut_point(members: list[tarfile.TarInfo], where: str) -> tuple[int, int]:
    """(byte to cut the shard at, how many samples stay whole and are shown whole) for a shard of 3 samples of 2 members
    each (`members`, in tar order): a sample is whole once the next sample's header, or the end-of-archive block, is there."""
    second, third = members[2:4], members[4:6]
    last_end = members[-1].offset_data + members[-1].size
    return {
        "inside an image": (next(m for m in second if m.name.endswith(".png")).offset_data + 100, 1),
        "between a sample's members": (second[1].offset, 1),  # its image without its caption, or the reverse
        "at a sample boundary": (third[0].offset, 1),  # the second sample whole, but nothing shows it is
        "inside a header": (third[0].offset + 200, 1),
        "after the last member": (-(-last_end // 512) * 512, 2),
        "inside the end-of-archive block": (-(-last_end // 512) * 512 + 100, 3),  # every member whole: no damage
    }[where]


@pytest.mark.parametrize("where", ["inside an image", "between a sample's members", "at a sample boundary",
                                   "inside a header", "after the last member", "inside the end-of-archive block"])
def test_a_shard_cut_off_anywhere_gives_only_whole_samples_each_with_its_own_caption(tmp_path, where):
    """A download cut off at a member boundary or inside a header left tarfile seeing a shard that just ends: its last
    sample, lacking its caption (or image), was counted as a sample without one and the shard was not counted as
    truncated by `samples_once` (evaluate's reader). Now, in every layout, a sample is used only once the shard shows its
    end, each with its own caption and all of its image, and the damage is counted as truncated_shard and nothing else.
    (A search over every 512-byte block boundary and mid-block offsets of such shards, in these layouts, img2dataset's
    jpg/json/txt, dotted keys and pax and GNU tars, found no sample paired with another's caption or a short image.)"""
    for layout, members_of in LAYOUTS.items():
        samples = [(noise_png(k), f"caption of sample {k}" + " and more" * k) for k in range(3)]
        members = [(f"{k:05d}.{extension}", data) for k, (image, caption) in enumerate(samples)
                   for extension, data in members_of(image, caption)]
        full = write_shard(tmp_path / layout / "00000.tar", members)
        with tarfile.open(full) as tar:
            cut, whole = cut_point(tar.getmembers(), where)
        shard = write_shard(full, members, cut=cut)
        expected = {caption: decode_rgb_reasons(image, R)[0] for image, caption in samples[:whole]}
        damage = {"truncated_shard": 1} if whole < 3 else {}

        stream = ShardStream(str(shard), R, shuffle_buffer=1, decode_threads=1)
        items = list(itertools.islice(iter(stream), 12))
        once = ShardStream(str(shard), R)
        items_once = list(once.samples_once())
        assert [item["caption"] for item in items_once] == list(expected), layout
        assert {item["caption"] for item in items} == set(expected), layout
        for item in items + items_once:
            assert torch.equal(item["image"], expected[item["caption"]]), (layout, item["caption"])
        assert dict(stream.skipped.counts) == damage and dict(once.skipped.counts) == damage, layout


def image_bytes(size: int, fmt: str) -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 90)).save(data, fmt)
    return data.getvalue()


def test_a_photo_between_pillows_limit_and_twice_it_is_decoded_without_a_warning(monkeypatch):
    """A medium-format photo or a scan of 89-179 M pixels was decoded with Pillow's DecompressionBombWarning printed on the
    user's terminal; it is a whole image, used downscaled. Pillow's limit is lowered so that a small image crosses it;
    one above twice the limit is still refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for fmt in ("JPEG", "PNG"):
        with warnings.catch_warnings(record=True) as caught:
            image, reasons = decode_rgb_reasons(image_bytes(12, fmt), R)  # 144 pixels: over the limit, under twice it
        assert image is not None and image.shape == (3, R, R) and reasons == [], fmt
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], fmt
        assert decode_rgb_reasons(image_bytes(15, fmt), R) == (None, ["too_large"]), fmt  # 225 pixels: over twice it


def tiff(values: np.ndarray) -> bytes:
    data = io.BytesIO()
    Image.fromarray(values).save(data, "TIFF")
    return data.getvalue()


def test_float_images_on_a_0_to_1_scale_are_read_and_others_without_a_known_scale_are_skipped(tmp_path):
    """A 32-bit float TIFF (Pillow mode "F") was read on a 0-255 scale, so one holding 0-1 values, the scale of float
    images in scikit-image and OpenCV, trained as black. It is now scaled by 255 ("converted_float"); a float image beyond
    [0, 1] (depth in metres, linear HDR) and a 32-bit integer one beyond 16 bits have no scale their file states: skipped,
    counted "unknown_scale", not trained as white. A 16-bit PGM, which Pillow reads as "I", is still 16-bit."""
    half = np.full((R, R), 0.5, np.float32)
    image, reasons = decode_rgb_reasons(tiff(half), R)
    assert reasons == ["converted_float"] and torch.allclose(image, torch.full((3, R, R), 128 / 127.5 - 1), atol=1e-6)
    pgm = io.BytesIO()
    Image.fromarray(np.full((R, R), 65535, np.uint16)).save(pgm, "PPM")
    assert Image.open(io.BytesIO(pgm.getvalue())).mode == "I"
    image, reasons = decode_rgb_reasons(pgm.getvalue(), R)
    assert reasons == ["converted_16bit"] and torch.allclose(image, torch.ones(3, R, R))

    (tmp_path / "half.tif").write_bytes(tiff(half))
    (tmp_path / "depth.tif").write_bytes(tiff(np.full((R, R), 3.5, np.float32)))
    (tmp_path / "counts.tif").write_bytes(tiff(np.full((R, R), 70000, np.int32)))
    for name in ("half", "depth", "counts"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} image")
    folder = ImageFolderDataset(tmp_path, R)
    read = [folder.read(i) for i in range(len(folder))]
    assert [sample["caption"] for sample in read if sample is not None] == ["a half image"]
    assert dict(folder.skipped.counts) == {"converted_float": 1, "unknown_scale": 2}
