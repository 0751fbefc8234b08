"""Image decoding and conversion, the image-folder dataset, and the resumable sampler."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import SkipCounter, decode_rgb, load_rgb
from latent_consistency.data.sampler import ResumableSampler
from latent_consistency.errors import UserError

R = 8


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def truncated_png() -> bytes:
    """The first half of a PNG of noise (noise, so the cut falls inside the compressed pixels)."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    return data[: len(data) // 2]


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] back to H x W x 3 uint8."""
    return np.rint((tensor.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


# --- decoding and conversion ---------------------------------------------------------------------------


def test_rgb_is_float32_in_range_resized_on_shorter_side_and_center_cropped():
    # 40x20: left half red, right half blue -> shorter side 8 gives 16x8, the central 8x8 is half and half
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    image = load_rgb(png_bytes(Image.fromarray(array)), R)
    assert image.shape == (3, R, R) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    pixels = to_uint8(image)
    assert (pixels[:, :3] == (255, 0, 0)).all() and (pixels[:, 5:] == (0, 0, 255)).all()


def test_grayscale_and_palette_become_rgb_and_are_counted():
    counter = SkipCounter()
    gray = load_rgb(png_bytes(Image.new("L", (R, R), 77)), R, counter)
    assert (to_uint8(gray) == 77).all()
    palette = Image.new("RGB", (R, R), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert tuple(to_uint8(load_rgb(png_bytes(palette), R, counter))[0, 0]) == (10, 200, 30)
    bilevel = load_rgb(png_bytes(Image.new("1", (R, R), 1)), R, counter)
    assert (to_uint8(bilevel) == 255).all()
    assert counter.counts == {"converted_grayscale": 2, "converted_palette": 1}


def test_alpha_is_composited_on_white_not_on_the_hidden_colour():
    rgba = Image.new("RGBA", (R, R), (255, 0, 0, 0))  # red, fully transparent
    rgba.paste((0, 0, 255, 255), (0, 0, R, R // 2))  # top half opaque blue
    image, reason = decode_rgb(png_bytes(rgba), R)
    pixels = to_uint8(image)
    assert reason == "converted_alpha"
    assert (pixels[: R // 2 - 1] == (0, 0, 255)).all()
    assert (pixels[R // 2 + 1 :] == 255).all()
    half = Image.new("LA", (R, R), (0, 128))  # black at half opacity over white -> mid gray
    assert abs(int(to_uint8(decode_rgb(png_bytes(half), R)[0])[0, 0, 0]) - 127) <= 1
    transparent_palette = Image.new("P", (R, R), 0)
    transparent_palette.putpalette([255, 0, 0] * 256)
    transparent_palette.info["transparency"] = 0
    image, reason = decode_rgb(png_bytes(transparent_palette), R)
    assert reason == "converted_alpha" and (to_uint8(image) == 255).all()


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I", "TIFF")])
def test_sixteen_bit_is_scaled_not_clipped(mode, fmt):
    array = np.array([[0, 257 * 100, 65535, 40000]] * 4, dtype=np.int32 if mode == "I" else np.uint16)
    image, reason = decode_rgb(png_bytes(Image.fromarray(array), fmt), 4)
    assert reason == "converted_16bit"
    assert to_uint8(image)[0, :, 0].tolist() == [0, 100, 255, round(40000 * 255 / 65535)]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", truncated_png(), b"\xff\xd8\xff" + b"\0" * 50],
    ids=["empty", "garbage", "truncated_png", "bad_jpeg"],
)
def test_bad_bytes_give_none_never_raise(data):
    counter = SkipCounter()
    assert load_rgb(data, R, counter) is None
    assert counter.counts == {"corrupt": 1}


def test_missing_file_gives_none(tmp_path):
    assert load_rgb(tmp_path / "gone.png", R) is None


def test_skip_counter_summary_separates_skips_from_conversions():
    counter = SkipCounter()
    assert counter.summary() == "nothing skipped or converted"
    for reason in ("corrupt", "no_caption", "no_caption", "converted_grayscale"):
        counter.add(reason)
    assert counter.summary() == "skipped: corrupt=1, no_caption=2; converted: grayscale=1"


def test_a_sample_named_by_its_detail_counts_once_however_often_it_is_drawn(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 20), 128, dtype=np.uint8)).save(gray)
    counter = SkipCounter()
    for _ in range(5):  # five epochs over one grayscale file
        assert load_rgb(gray, R, counter) is not None
    assert counter.summary() == "converted: grayscale=1"
    counter.add("corrupt")
    counter.add("corrupt")  # no detail: each one counts
    assert counter.counts["corrupt"] == 2


# --- image folder --------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    """Every kind of image and caption problem, captions in metadata.jsonl."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "rgb.png").write_bytes(png_bytes(Image.new("RGB", (12, 10), (200, 10, 10))))
    (tmp_path / "gray.png").write_bytes(png_bytes(Image.new("L", (R, R), 50)))
    (tmp_path / "rgba.png").write_bytes(png_bytes(Image.new("RGBA", (R, R), (0, 255, 0, 0))))
    (tmp_path / "sub" / "deep.png").write_bytes(png_bytes(Image.new("I;16", (R, R), 65535)))
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "truncated.png").write_bytes(truncated_png())
    (tmp_path / "uncaptioned.png").write_bytes(png_bytes(Image.new("RGB", (R, R))))
    lines = [
        {"file_name": "rgb.png", "text": "a red square"},
        {"file_name": "gray.png", "caption": "a gray square"},
        {"file_name": "rgba.png", "text": "nothing"},
        {"file_name": "sub/deep.png", "text": "white"},
        {"file_name": "corrupt.jpg", "text": "broken"},
        {"file_name": "truncated.png", "text": "cut"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "rgb.png", "text": "   "},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n"
    (tmp_path / "metadata.jsonl").write_text(text)
    return tmp_path


def test_metadata_scan_counts_uncaptioned_missing_and_bad_lines(folder):
    dataset = ImageFolderDataset(folder, R)
    assert [caption for _, caption in dataset.samples] == [
        "a red square", "a gray square", "nothing", "white", "broken", "cut"
    ]
    assert dataset.skipped.counts == {"no_caption": 2, "missing_file": 1, "bad_metadata": 1}


def test_items_are_converted_and_corrupt_files_fall_through_to_the_next(folder):
    dataset = ImageFolderDataset(folder, R)
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        assert item["image"].shape == (3, R, R) and item["image"].dtype == torch.float32
    assert (to_uint8(items[2]["image"]) == 255).all()  # transparent green -> white
    assert (to_uint8(items[3]["image"]) == 255).all()  # 16-bit full scale -> 255
    # corrupt.jpg (4) and truncated.png (5) are skipped to the next usable index, wrapping around
    assert items[4]["caption"] == "a red square" and items[5]["caption"] == "a red square"
    dataset[4]
    counts = dataset.skipped.counts
    assert counts["corrupt"] == 2  # each bad file counted once, however often it is asked for
    assert counts["converted_grayscale"] == 1 and counts["converted_alpha"] == 1 and counts["converted_16bit"] == 1


def test_sidecar_captions(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(Image.new("RGB", (R, R))))
    (tmp_path / "a.txt").write_text("  first caption\n")
    (tmp_path / "b.txt").write_text("\n")
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("a.png", "first caption")]
    assert dataset.skipped.counts == {"no_caption": 2}
    assert dataset[0]["caption"] == "first caption"


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", R)
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(tmp_path, R)
    (tmp_path / "a.png").write_bytes(png_bytes(Image.new("RGB", (R, R))))
    with pytest.raises(UserError, match="no usable captioned image.*no_caption=1"):
        ImageFolderDataset(tmp_path, R)
    (tmp_path / "a.png").write_bytes(b"corrupt")
    (tmp_path / "a.txt").write_text("caption")
    dataset = ImageFolderDataset(tmp_path, R)
    with pytest.raises(UserError, match="could be decoded"):
        dataset[0]


# --- resumable sampler ---------------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_walks_seeded_epoch_permutations():
    sequence = take(iter(ResumableSampler(7, seed=3)), 21)
    for epoch in range(3):
        assert sorted(sequence[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert sequence[:7] != sequence[7:14]
    assert sequence == take(iter(ResumableSampler(7, seed=3)), 21)
    assert sequence != take(iter(ResumableSampler(7, seed=4)), 21)


def test_sampler_resume_is_exact_across_epoch_boundaries():
    sampler = ResumableSampler(7, seed=1)
    iterator = iter(sampler)
    first = take(iterator, 9)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    rest = take(iterator, 20)
    resumed = ResumableSampler(7, seed=1)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert take(iter(resumed), 20) == rest
    assert first + rest == take(iter(ResumableSampler(7, seed=1)), 29)


def test_sampler_state_accounts_for_indices_in_flight():
    sampler = ResumableSampler(5, seed=0)
    iterator = iter(sampler)
    take(iterator, 10)  # a DataLoader delivered 6 and has 4 prefetched
    assert sampler.state_dict(in_flight=4) == {"epoch": 1, "index": 1, "num_samples": 5}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch_exactly(world_size):
    batch, steps, n = 2, 6, 10
    single = take(iter(ResumableSampler(n, seed=5)), batch * world_size * steps)
    ranks = [iter(ResumableSampler(n, seed=5, rank=r, world_size=world_size)) for r in range(world_size)]
    for step in range(steps):
        union = sorted(i for rank in ranks for i in take(rank, batch))
        assert union == sorted(single[step * batch * world_size : (step + 1) * batch * world_size])


def test_ranks_resume_from_one_shared_state():
    samplers = [ResumableSampler(9, seed=2, rank=r, world_size=2) for r in range(2)]
    iterators = [iter(s) for s in samplers]
    for iterator in iterators:
        take(iterator, 5)
    state = samplers[0].state_dict()
    assert state == samplers[1].state_dict()
    for rank, iterator in enumerate(iterators):
        resumed = ResumableSampler(9, seed=2, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        assert take(iter(resumed), 7) == take(iterator, 7)


def test_sampler_rejects_a_state_from_another_dataset():
    state = ResumableSampler(9).state_dict()
    with pytest.raises(UserError, match="dataset of 9 samples"):
        ResumableSampler(8).load_state_dict(state)


def test_dataloader_over_image_folder_resumes_at_the_next_sample(folder):
    dataset = ImageFolderDataset(folder, R)
    sampler = ResumableSampler(len(dataset), seed=0)
    loader = iter(DataLoader(dataset, batch_size=2, sampler=sampler))
    next(loader)
    state = sampler.state_dict()
    expected = next(loader)
    resumed = ResumableSampler(len(dataset), seed=0)
    resumed.load_state_dict(state)
    batch = next(iter(DataLoader(dataset, batch_size=2, sampler=resumed)))
    assert batch["caption"] == expected["caption"] and torch.equal(batch["image"], expected["image"])


def test_counters_of_several_processes_merge_each_named_sample_once():
    """DataLoader workers each count in their copy of the folder's counter (which starts from the scan's counts): a file
    two workers both found corrupt is one skipped sample; an add without a detail is one per copy that made it."""
    scan = SkipCounter()
    scan.add("no_caption", "a.png")
    events = []
    for corrupt in (["b.png"], ["b.png", "c.png"]):
        worker = SkipCounter(counts=scan.counts.copy(), seen=set(scan.seen), pending=[])
        for name in corrupt:
            worker.add("corrupt", name)
        worker.add("converted_grayscale")
        events += worker.take_pending()
        assert worker.take_pending() == []  # each event is sent once
    merged = scan.with_counted(events)
    untracked = SkipCounter()  # a counter nobody collects from keeps no events: a long run would grow them without end
    untracked.add("converted_grayscale")
    assert untracked.pending is None
    assert merged.counts == {"no_caption": 1, "corrupt": 2, "converted_grayscale": 2}


def test_training_batches_report_what_their_dataloader_workers_skipped(tiny_sd, tmp_path):
    """With --num-workers 2 the images are decoded in worker processes: their skips reach the end-of-run summary,
    which said "nothing skipped or converted" before."""
    from latent_consistency.models import load_diffusion_model
    from latent_consistency.training.batches import TrainingBatches, merged_skipped_summary
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "data", 8)
    (folder / "3.png").write_bytes(truncated_png())
    Image.open(folder / "5.png").convert("L").save(folder / "5.png")
    batches = TrainingBatches(str(folder), load_diffusion_model(str(tiny_sd)), 16, 4, seed=0, num_workers=2)
    for _ in range(6):  # three epochs: each file counted once however often it is drawn
        next(batches)
    assert merged_skipped_summary([batches.skipped_record()]) == "skipped: corrupt=1; converted: grayscale=1"


@pytest.mark.parametrize("line", [{"file_name": "a.png", "text": "  "}, {"file_name": "a.png"}, {"file_name": "a.png", "text": "\u0000"},
                                  {"file_name": "link.png", "text": "a dangling link"}])
def test_an_image_whose_line_gives_no_sample_is_counted_once(tmp_path, line):
    """Was counted twice: once for its line (no caption, a bad caption, a missing file) and once more as "a.png is not in
    metadata.jsonl", so that a folder's summary counted twice the images it left out."""
    (tmp_path / "a.png").write_bytes(png_bytes(Image.new("RGB", (R, R))))
    (tmp_path / "b.png").write_bytes(png_bytes(Image.new("RGB", (R, R))))
    lines = [line, {"file_name": "b.png", "text": "a black square"}]
    if line["file_name"] == "link.png":
        (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
        lines.append({"file_name": "a.png", "text": "a black square too"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    dataset = ImageFolderDataset(tmp_path, R)
    assert sum(dataset.skipped.counts.values()) == 1, dataset.skipped.counts
