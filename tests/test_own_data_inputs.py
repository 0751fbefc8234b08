"""A user's own training data (`lcm distill` / `lcm finetune` --data and --eval-data): captions saved in the wrong
encoding, folders linked in, hidden or unreadable, images in formats the reader does not take, too large or with a
garbage EXIF block, a manifest.json of another tool, a damaged latent cache, a brace pattern of millions of shards, a
folder name with brackets. Each is refused in one line, or skipped and counted, or read as it should be; none is trained
on wrongly or dropped without a word."""

import io
import json
import tarfile
import time

import pytest
import torch
from PIL import Image

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.shards import ShardStream, check_usable, expand_urls
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError

R = 8


def png_bytes() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (R, R), (200, 30, 30)).save(data, "PNG")
    return data.getvalue()


def captioned_png(path, caption: bytes | str = "a red square"):
    """`path` (a .png) with its sidecar caption; returns the image's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes())
    path.with_suffix(".txt").write_bytes(caption.encode() if isinstance(caption, str) else caption)
    return path


def write_shard(path, members):
    """A tar of (name, bytes) members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


# --- captions in the wrong encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_sidecar_caption_without_a_bom_is_skipped_not_trained_on(encoding, tmp_path):
    """UTF-16 text without a byte-order mark is valid UTF-8 full of NUL characters: never a caption to train on."""
    captioned_png(tmp_path / "a.png", "a cat".encode(encoding))
    captioned_png(tmp_path / "b.png", "a dog")
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("b.png", "a dog")]
    assert dataset.skipped.counts == {"bad_caption": 1}


def test_a_metadata_caption_with_a_nul_character_is_skipped(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes())
    lines = [{"file_name": "a.png", "text": "a\u0000 \u0000c\u0000a\u0000t"}, {"file_name": "b.png", "text": "a dog"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("b.png", "a dog")]
    assert dataset.skipped.counts["bad_caption"] == 1


def test_a_utf16_shard_caption_is_skipped_not_trained_on(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [
        ("a.png", png_bytes()), ("a.txt", "a cat".encode("utf-16-le")),
        ("b.png", png_bytes()), ("b.json", json.dumps({"caption": "a\u0000b"}).encode()),
        ("c.png", png_bytes()), ("c.txt", b"a dog"),
    ])
    stream = ShardStream(str(shard), R, shuffle_buffer=1, decode_threads=1)
    samples = iter(stream)
    assert {next(samples)["caption"] for _ in range(4)} == {"a dog"}
    samples.close()
    assert stream.skipped.counts["bad_caption"] == 2


def test_shards_whose_only_captions_are_utf16_are_refused(tmp_path):
    shard = write_shard(tmp_path / "00000.tar", [("a.png", png_bytes()), ("a.txt", "a cat".encode("utf-16-le"))])
    with pytest.raises(UserError, match="no usable sample.*bad_caption=1"):
        check_usable(ShardStream(str(shard), R))


# --- what an image folder holds --------------------------------------------------------------------------------------


def test_images_in_a_symlinked_subfolder_are_read(tmp_path):
    """A folder of images linked in (`ln -s /mnt/disk2/part2 data/part2`) is part of the data, not silently left out; a
    link back up the tree is not followed round and round."""
    captioned_png(tmp_path / "elsewhere" / "b.png", "a dog")
    root = tmp_path / "data"
    captioned_png(root / "a.png", "a cat")
    (root / "part2").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert sorted(ImageFolderDataset(root, R).samples) == [("a.png", "a cat"), ("part2/b.png", "a dog")]
    assert len(open_dataset(str(root), R)) == 2


def test_a_dangling_symlinked_image_is_counted(tmp_path):
    captioned_png(tmp_path / "a.png", "a cat")
    (tmp_path / "b.png").symlink_to(tmp_path / "moved-away.png")
    (tmp_path / "b.txt").write_text("a dog")
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("a.png", "a cat")]
    assert dataset.skipped.counts == {"missing_file": 1}


def test_images_in_formats_the_reader_does_not_take_are_counted(tmp_path):
    """Half of an iPhone export is .heic: those are not read, and the log says so."""
    captioned_png(tmp_path / "a.png", "a cat")
    for name in ("b.heic", "c.jxl"):
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
        (tmp_path / name).with_suffix(".txt").write_text("a dog")
    (tmp_path / "notes.md").write_text("not an image, not counted")
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("a.png", "a cat")]
    assert dataset.skipped.counts == {"unsupported_format": 2}


def test_formats_this_pillow_decodes_are_read(tmp_path):
    """A phone's .avif and an old camera's .jfif (a JPEG by another name) are images Pillow decodes: read, not skipped."""
    for name, format in (("a.avif", "AVIF"), ("b.jfif", "JPEG")):
        Image.new("RGB", (R, R), (200, 10, 10)).save(tmp_path / name, format=format)
        (tmp_path / name).with_suffix(".txt").write_text(f"a red {format}")
    dataset = ImageFolderDataset(tmp_path, R)
    assert sorted(dataset.samples) == [("a.avif", "a red AVIF"), ("b.jfif", "a red JPEG")]
    assert all(dataset[i]["image"].shape == (3, R, R) for i in range(2)) and not dataset.skipped.counts


def test_a_folder_of_unsupported_images_says_which_format(tiny_sd, tmp_path, run_error):
    for i in range(2):
        (tmp_path / "photos" / f"IMG_{i}.HEIC").parent.mkdir(exist_ok=True)
        (tmp_path / "photos" / f"IMG_{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    code, err = run_error(["distill", "--teacher", str(tiny_sd), "--data", str(tmp_path / "photos"), "--out",
                           str(tmp_path / "run"), "--steps", "1", "--batch-size", "2"])
    assert code == 2 and "Traceback" not in err and not (tmp_path / "run").exists(), err
    last = err.splitlines()[-1]
    assert last.startswith("lcm distill: error:") and "2 .heic" in last and "convert" in last, err


def test_hidden_files_do_not_decide_what_kind_of_data_a_folder_holds(tmp_path):
    """A hidden thumbnail cache does not make a shard folder "both images and shards", and macOS's ._00000.tar (a
    resource fork, not a tar) is not a shard."""
    write_shard(tmp_path / "00000.tar", [("a.png", png_bytes()), ("a.txt", b"a cat")])
    (tmp_path / "._00000.tar").write_bytes(b"\x00\x05\x16\x07" + bytes(4000))
    (tmp_path / ".thumbnails").mkdir()
    (tmp_path / ".thumbnails" / "a.png").write_bytes(png_bytes())
    stream = open_dataset(str(tmp_path), R)
    assert isinstance(stream, ShardStream) and stream.shards == [str(tmp_path / "00000.tar")]


def test_a_manifest_of_another_tool_among_images_says_what_to_do(tmp_path):
    """A manifest.json makes a folder a latent cache; one that is not a cache's says to move it, not to "rebuild" it."""
    captioned_png(tmp_path / "a.png", "a cat")
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "my holiday photos"}))
    with pytest.raises(UserError, match="is not a latent cache's.*move manifest.json"):
        open_dataset(str(tmp_path), R)


# --- latent caches and shard patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["latents", "text_embeddings", "uncond_embedding"])
def test_a_latent_cache_with_non_finite_values_is_refused(damaged, tmp_path):
    """An fp16 VAE (or T5 text encoder) overflows to NaN or infinity on some inputs: a cache holding those is damaged,
    not data to train on."""
    from safetensors.torch import save_file

    from latent_consistency.data.latent_cache import LatentCache

    tensors = {"latents": torch.zeros(3, 4, 2, 2), "text_embeddings": torch.zeros(2, 3, 8), "uncond_embedding": torch.zeros(3, 8)}
    tensors[damaged].view(-1)[5] = float("inf")
    save_file({"latents": tensors["latents"], "caption_index": torch.tensor([0, 1, 1])}, str(tmp_path / "shard-00000.safetensors"))
    save_file({key: tensors[key] for key in ("text_embeddings", "uncond_embedding")}, str(tmp_path / "captions.safetensors"),
              metadata={"captions": json.dumps(["a cat", "a dog"])})
    manifest = {"format": "latent-cache/1", "num_samples": 3, "shards": [{"file": "shard-00000.safetensors", "num_samples": 3}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"damaged: its {damaged} hold NaN or infinite values"):
        LatentCache(tmp_path)


def test_a_brace_pattern_of_millions_of_shards_is_refused_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="more than"):
        expand_urls(str(tmp_path / "{000000000..999999999}.tar"))
    with pytest.raises(UserError, match="more than"):
        expand_urls(str(tmp_path / "{00000..99999}/{00000..99999}.tar"))
    assert time.monotonic() - start < 5


# --- unreadable files, very large or odd images, odd names -----------------------------------------------------------


def _refuse(paths):
    """A stand-in for a reader that is refused (permission denied) `paths` and reads everything else as before."""
    def decorate(read):
        def refused(target, *args, **kwargs):
            if str(target) in {str(p) for p in paths}:
                raise PermissionError(13, "Permission denied", str(target))
            return read(target, *args, **kwargs)
        return refused
    return decorate


def test_an_unreadable_subfolder_is_refused_not_left_out(tmp_path, monkeypatch):
    """(Tests run as root, who reads everything: the refusal is simulated.)"""
    import os

    captioned_png(tmp_path / "a.png", "a cat")
    captioned_png(tmp_path / "private" / "b.png", "a dog")
    monkeypatch.setattr(os, "scandir", _refuse([tmp_path / "private", tmp_path / "locked"])(os.scandir))
    with pytest.raises(UserError, match="cannot read the folder .*private.*Permission denied"):
        ImageFolderDataset(tmp_path, R)
    (tmp_path / "locked").mkdir()
    with pytest.raises(UserError, match="cannot read the folder .*locked.*Permission denied"):
        open_dataset(str(tmp_path / "locked"), R)


def test_unreadable_captions_are_counted_and_unreadable_metadata_refused(tmp_path, monkeypatch):
    from pathlib import Path

    from latent_consistency.data import imagefolder

    captioned_png(tmp_path / "a.png", "a cat")
    captioned_png(tmp_path / "b.png", "a dog")
    monkeypatch.setattr(imagefolder, "_read_bytes", _refuse([tmp_path / "a.txt"])(imagefolder._read_bytes))
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("b.png", "a dog")] and dataset.skipped.counts == {"bad_caption": 1}
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n")
    monkeypatch.setattr(Path, "open", _refuse([tmp_path / "metadata.jsonl"])(Path.open))
    with pytest.raises(UserError, match="cannot read .*metadata.jsonl.*Permission denied"):
        ImageFolderDataset(tmp_path, R)


def test_an_image_over_pillows_pixel_limit_is_counted_as_too_large_not_corrupt(tmp_path, monkeypatch):
    """A 200-megapixel scan is a whole image, not a damaged one: the log says it is too large (the limit is lowered here
    so that the test image stays small)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # Pillow refuses more than twice this
    captioned_png(tmp_path / "a.png", "a cat")
    dataset = ImageFolderDataset(tmp_path, R)
    with pytest.raises(UserError, match="could be decoded.*too_large=1"):
        dataset[0]
    shard = write_shard(tmp_path / "shards" / "00000.tar", [("a.png", png_bytes()), ("a.txt", b"a cat")])
    stream = ShardStream(str(shard), R)
    with pytest.raises(UserError, match="no usable sample.*too_large=1"):
        check_usable(stream)


def test_shards_in_a_folder_whose_name_has_brackets_are_read(tmp_path):
    """"photos [2024]" is a folder name, not a glob: a shard that exists there is read as it is named."""
    folder = tmp_path / "photos [2024]"
    shard = write_shard(folder / "00000.tar", [("a.png", png_bytes()), ("a.txt", b"a cat")])
    assert expand_urls(str(shard)) == [str(shard)]
    assert open_dataset(str(folder), R).shards == [str(shard)]
    assert open_dataset(str(shard), R).shards == [str(shard)]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_an_image_with_an_unreadable_exif_block_is_read_as_stored(fmt, tmp_path):
    """The pixels of an image whose EXIF block is garbage are whole: it is read as stored (as a browser shows it), not
    dropped as corrupt."""
    from latent_consistency.data.images import decode_rgb

    data = io.BytesIO()
    Image.new("RGB", (2 * R, R), (200, 30, 30)).save(data, fmt, exif=b"Exif\x00\x00garbage-garbage-garbage")
    image, reason = decode_rgb(data.getvalue(), R)
    assert reason is None and image.shape == (3, R, R)


def test_shards_read_the_image_formats_a_folder_reads(tmp_path):
    """A sample of key.tif (or .bmp, .gif) and key.txt trains from a shard as it does from a folder, not dropped as
    "no_image"."""
    members = []
    for fmt, extension in (("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif")):
        data = io.BytesIO()
        Image.new("RGB", (R, R), (200, 30, 30)).save(data, fmt)
        members += [(f"{extension}.{extension}", data.getvalue()), (f"{extension}.txt", extension.encode())]
    stream = ShardStream(str(write_shard(tmp_path / "00000.tar", members)), R, shuffle_buffer=1, decode_threads=1)
    samples = iter(stream)
    assert {next(samples)["caption"] for _ in range(6)} == {"tif", "bmp", "gif"}
    samples.close()
    assert "no_image" not in stream.skipped.counts
