"""The review of the images a user brings (/tmp/h/images-report.md): still formats Pillow decodes (.jpe, .ppm, .tga, ...)
read, other image formats counted as unsupported; tRNS transparency on white; COCO-style list captions and a null "text"
falling back to "caption"; a UTF-16 metadata.jsonl refused saying so; .TXT and .caption sidecars; webdataset `key.text`
captions; a refused `lcm cache` leaving no OUT.partial; captions the text encoder cuts noted; a cache's resume identity
independent of the current folder."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from latent_consistency.data import latent_cache
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import decode_rgb_reasons
from latent_consistency.data.shards import ShardStream
from latent_consistency.errors import UserError


def _picture() -> Image.Image:
    return Image.new("RGB", (20, 20), (9, 90, 9))


def _captioned(folder, name, fmt, caption=None):
    """`name` saved as `fmt` in `folder`, with a .txt sidecar of its stem."""
    folder.mkdir(parents=True, exist_ok=True)
    _picture().save(folder / name, fmt)
    (folder / name).with_suffix(".txt").write_text(caption or name)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


# --- 1. formats ---------------------------------------------------------------------------------------------------------

def test_still_formats_pillow_decodes_are_read(tmp_path):
    for name, fmt in [("a.png", "PNG"), ("b.jpe", "JPEG"), ("c.ppm", "PPM"), ("d.tga", "TGA"), ("e.dib", "DIB"), ("f.QOI", "QOI")]:
        _captioned(tmp_path, name, fmt)
    Image.new("L", (20, 20), 7).save(tmp_path / "g.pgm")
    (tmp_path / "g.txt").write_text("gray")
    dataset = ImageFolderDataset(tmp_path, 16)
    assert sorted(dataset.samples.files) == ["a.png", "b.jpe", "c.ppm", "d.tga", "e.dib", "f.QOI", "g.pgm"]
    assert all(dataset.read(i) is not None for i in range(len(dataset)))


def test_a_captioned_image_in_a_format_not_read_is_counted_not_hidden(tmp_path):
    _captioned(tmp_path, "a.png", "PNG")
    _captioned(tmp_path, "b.ico", "ICO")
    dataset = ImageFolderDataset(tmp_path, 16)
    assert len(dataset) == 1 and dataset.skipped.summary() == "skipped: unsupported_format=1"


# --- 2. tRNS transparency ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, key, centre", [("RGB", (0, 0, 0), [200, 0, 0]), ("L", 0, [200] * 3),
                                              ("I;16", 1000, [156] * 3)])  # 40000 · 255/65535, not clipped at 255
def test_a_transparency_key_is_put_on_white(mode, key, centre):
    if mode == "I;16":
        values = np.full((20, 20), 1000, dtype=np.uint16)
        values[5:15, 5:15] = 40000
        image = Image.fromarray(values)
    else:
        image = Image.new(mode, (20, 20), key)
        image.paste(200 if mode == "L" else (200, 0, 0), (5, 5, 15, 15))
    source = _png(image, transparency=key)
    assert Image.open(io.BytesIO(source)).mode == mode
    decoded, reasons = decode_rgb_reasons(source, 20)
    pixels = ((decoded + 1) * 127.5).round().int()
    assert pixels[:, 0, 0].tolist() == [255, 255, 255] and pixels[:, 10, 10].tolist() == centre and reasons == ["converted_alpha"]


# --- 3. list captions and the caption fallback -------------------------------------------------------------------------

def _metadata_folder(folder, rows: list[dict]):
    folder.mkdir()
    for row in rows:
        _picture().save(folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_a_list_of_captions_gives_its_first_and_a_null_text_falls_back_to_caption(tmp_path):
    folder = _metadata_folder(tmp_path / "f", [
        {"file_name": "a.png", "text": ["a photo of a", "another of a"]},
        {"file_name": "b.png", "text": [" ", None, "the first usable of b"]},
        {"file_name": "c.png", "text": None, "caption": "c from caption"},
        {"file_name": "d.png", "text": "", "caption": "d from caption"},
    ])
    dataset = ImageFolderDataset(folder, 16)
    assert list(dataset.samples) == [("a.png", "a photo of a"), ("b.png", "the first usable of b"), ("c.png", "c from caption"),
                                     ("d.png", "d from caption")]
    assert dataset.skipped.summary() == "nothing skipped or converted"


def _shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_shards_read_a_list_caption_in_json_and_key_text_members(tmp_path):
    picture = _png(_picture())
    shard = _shard(tmp_path / "00000.tar", {
        "a.png": picture, "a.json": json.dumps({"caption": ["first of a", "second of a"]}).encode(),
        "b.png": picture, "b.text": b"b from key.text",
    })
    stream = ShardStream([shard], 16)
    assert stream.first_captions(2) == ["first of a", "b from key.text"]


# --- 4. a UTF-16 metadata.jsonl ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, byte", [("utf-16", "0xff at 0"), ("utf-16-le", "0x00 at 1")])
def test_a_utf16_metadata_jsonl_is_refused_saying_it_is_not_utf8(tmp_path, encoding, byte):
    folder = _metadata_folder(tmp_path / "f", [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}])
    lines = (folder / "metadata.jsonl").read_text().replace("\n", "\r\n")
    (folder / "metadata.jsonl").write_bytes(lines.encode(encoding))
    with pytest.raises(UserError, match=f"metadata.jsonl is not UTF-8 text \\(byte {byte}: UTF-16\\?\\); save it as UTF-8") as err:
        ImageFolderDataset(folder, 16)
    assert "\n" not in str(err.value)


# --- 5. sidecars -------------------------------------------------------------------------------------------------------

def test_upper_case_txt_and_caption_sidecars_are_read(tmp_path):
    for stem in ("IMG_0001", "IMG_0002", "kohya", "both"):
        _picture().save(tmp_path / f"{stem}.JPG")
    (tmp_path / "IMG_0001.TXT").write_text("upper")
    (tmp_path / "IMG_0002.txt").write_text("lower")
    (tmp_path / "kohya.caption").write_text("kohya's")
    (tmp_path / "both.caption").write_text("not this one")
    (tmp_path / "both.Txt").write_text("the .txt first")
    dataset = ImageFolderDataset(tmp_path, 16)
    assert dict(dataset.samples) == {"IMG_0001.JPG": "upper", "IMG_0002.JPG": "lower", "kohya.JPG": "kohya's", "both.JPG": "the .txt first"}


def test_a_folder_without_captions_names_the_sidecars_it_reads(tmp_path):
    _picture().save(tmp_path / "a.png")
    with pytest.raises(UserError, match=r"\.txt or \.caption sidecar captions.*a\.txt \(or a\.caption\) next to a\.png"):
        ImageFolderDataset(tmp_path, 16)


# --- 6 and 8. lcm cache: a refusal leaves nothing, a cut caption is noted ------------------------------------------------

def test_a_refused_cache_of_shards_names_the_caption_members_and_leaves_no_partial(tiny_sd, tmp_path, run_error):
    shard = _shard(tmp_path / "00000.tar", {"k.png": _png(_picture()), "k.words": b"no caption member"})
    out = tmp_path / "cache"
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", shard, "--out", str(out)])
    assert code == 2 and "no usable sample in the data (skipped: no_caption=1)" in err and "key.text" in err, err
    assert not out.exists() and not (tmp_path / "cache.partial").exists()


def test_a_cache_notes_the_captions_the_text_encoder_cuts(tiny_sd, tmp_path):
    from latent_consistency.models import load_diffusion_model

    model = load_diffusion_model(str(tiny_sd))
    long = " ".join(["a red star on a gray background"] * 6)
    folder = _metadata_folder(tmp_path / "f", [{"file_name": "a.png", "text": "a star"}, {"file_name": "b.png", "text": long}])
    said = []
    latent_cache.write_latent_cache(ImageFolderDataset(folder, 16), tmp_path / "cache", model.codec, model.prompts, {}, progress=False,
                                    say=said.append)
    assert [line for line in said if "cuts" in line] == [
        "note: the text encoder reads at most 16 tokens of a caption, and cuts 1 of the 2 distinct captions (the longest is 152 tokens), "
        "as diffusers cuts them; shorten them to train on all of each"]


def test_a_run_notes_its_first_cut_caption_once_and_checks_only_its_first_captions(tiny_sd, monkeypatch, caplog):
    """A run without a latent cache encodes its captions step by step (`training.batches._encoded_captions`): one note at the
    first cut, none after; and past CAPTIONS_CHECKED captions it tokenizes them no more than encoding does."""
    from latent_consistency.data.latent_cache import LongCaptions
    from latent_consistency.models import load_diffusion_model
    from latent_consistency.training import batches

    model = load_diffusion_model(str(tiny_sd))
    long_caption = " ".join(["a red star on a gray background"] * 6)
    monkeypatch.setattr(batches, "CAPTIONS_CHECKED", 4)
    checked = LongCaptions(model.prompts)
    for captions in (["a star", "a ring"], ["a cube", "a disc"], [long_caption, "a star"]):  # the cut one past the first 4
        batches._encoded_captions(model, captions, "cpu", 16, checked)
    assert checked.seen == 4 and not checked.count
    cut = LongCaptions(model.prompts)
    with caplog.at_level("WARNING", logger="latent_consistency.data"):
        for captions in (["a star", long_caption], [long_caption, long_caption]):
            batches._encoded_captions(model, captions, "cpu", 16, cut)
    notes = [r.getMessage() for r in caplog.records if "cuts" in r.getMessage()]
    assert len(notes) == 1 and "cuts 1 of the 2 captions of the data read so far" in notes[0], notes
    # the other processes of a launched run say nothing (was: one note per process, each of its own captions)
    monkeypatch.setattr(batches, "first_process", lambda: False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="latent_consistency.data"):
        batches._encoded_captions(model, [long_caption], "cpu", 16, LongCaptions(model.prompts))
    assert not [r for r in caplog.records if "cuts" in r.getMessage()]


# --- the resume identity of a cache ------------------------------------------------------------------------------------

def test_a_cache_source_that_names_no_path_does_not_depend_on_the_current_folder(tmp_path, monkeypatch):
    source = {"dataset": "shapes", "split": "train", "resolution": 32}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    (tmp_path / "train").write_text("a file of that name")
    assert latent_cache._as_real_paths(source) == source
    assert latent_cache._as_real_paths({"data": "shapes"}) == {"data": str(tmp_path.resolve() / "shapes")}  # --data names it
