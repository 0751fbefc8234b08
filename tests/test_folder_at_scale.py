"""An image folder at the paper's scale (LAION-Aesthetics: 12 million captioned images), on small folders: what each training
process holds per sample, how often the folder's files are read for its fingerprint, what grows with the DataLoader
workers' skip events, and which images are decoded for their captions alone. No timings: bytes, reads and decodes counted."""

import gc
import hashlib
import json
import os
import pickle
import tracemalloc
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest
from PIL import Image

from latent_consistency.data import imagefolder
from latent_consistency.data import images as images_module
from latent_consistency.data.imagefolder import ImageFolderDataset, as_posix
from latent_consistency.data.images import SkipCounter, SkipEvents
from latent_consistency.training.batches import TrainingBatches

R = 16
CAPTION = "a photograph of a small red house by a lake at dusk, in the style of an oil painting, number {i}"


@pytest.fixture(scope="module")
def model(tiny_sd):
    from latent_consistency.models import load_diffusion_model

    return load_diffusion_model(str(tiny_sd))


def _old_digest(rows: list[tuple]) -> str:
    """The digest checkpoints have always recorded (`_rows_digest`'s docstring): SHA-256 of json.dumps of the rows."""
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _odd_folder(root: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A metadata.jsonl folder of nested, non-ASCII and non-UTF-8 file names, an image captioned twice and one not at all,
    names written "./x" and "a//b", and lines that are skipped; and the samples the scan has always made of it, in order."""
    not_utf8 = os.fsdecode(b"\xff\xfe.png")
    for i, name in enumerate(["a.png", "sub/b.png", "sub/deeper/c.png", "café/ü.png", not_utf8, "z.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)).save(root / name, format="PNG")
    lines = [{"file_name": "./sub/b.png", "text": "a dog ☃"}, {"file_name": "a.png", "text": "  a cat  "},
             {"file_name": "sub//deeper/c.png", "text": "a bird\nin two lines"}, {"file_name": "missing.png", "text": "x"},
             {"file_name": 5, "text": "x"}, {"file_name": "a.png", "text": "a cat, again"}, {"file_name": "café/ü.png", "text": "é"},
             {"file_name": not_utf8, "text": "a name that is not UTF-8"}]
    with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return root, [("sub/b.png", "a dog ☃"), ("a.png", "a cat"), ("sub/deeper/c.png", "a bird\nin two lines"),
                  ("a.png", "a cat, again"), ("café/ü.png", "é"), (not_utf8, "a name that is not UTF-8")]


def test_the_samples_and_the_fingerprints_are_those_checkpoints_recorded(tmp_path):
    """The samples are held in two UTF-8 buffers now, not a list of tuples: the same samples in the same order come out,
    and the fingerprints (sampled bytes, and the earlier sizes-only one) are the digests old runs' checkpoints hold, so
    that they resume."""
    root, expected = _odd_folder(tmp_path / "data")
    dataset = ImageFolderDataset(root, R)
    assert dataset.samples == expected and list(dataset.samples) == expected and dataset.samples[-1] == expected[-1]
    assert pickle.loads(pickle.dumps(dataset)).samples == expected  # as DataLoader workers get it where they are spawned
    assert dataset.skipped.counts == {"missing_file": 1, "bad_metadata": 1, "no_caption": 1}
    stamps = [(caption, imagefolder._file_sample_digest(root / name)) for name, caption in expected]
    sizes = [(caption, (root / name).stat().st_size) for name, caption in expected]
    assert dataset.fingerprint() == _old_digest(stamps) and dataset.size_fingerprint() == _old_digest(sizes)
    # .txt sidecars, a non-UTF-8 file name among them: the same pairs, the same digest
    sidecars = tmp_path / "sidecars"
    for name in ("b.png", os.fsdecode(b"\xe9t\xe9.png"), "n/a.png"):
        (sidecars / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(sidecars / name, format="PNG")
        (sidecars / name).with_suffix(".txt").write_text(f"caption of {name.encode('utf-8', 'surrogateescape')!r}")
    dataset = ImageFolderDataset(sidecars, R)
    names = sorted(["b.png", os.fsdecode(b"\xe9t\xe9.png"), "n/a.png"])
    assert [name for name, _ in dataset.samples] == names
    assert dataset.fingerprint() == _old_digest([(caption, imagefolder._file_sample_digest(sidecars / name))
                                                 for name, caption in dataset.samples])
    assert dataset.read(names.index("n/a.png"))["caption"] == "caption of b'n/a.png'"


def test_a_metadata_file_name_is_read_as_a_path_reads_it():
    """Metadata names are normalised as `Path(name).as_posix()` always did (the held-out split hashes them, so a resumed run
    keeps its split), without making a Path of each of 12 million lines."""
    names = ["", ".", "./", "/", "//", "///", "////a", "//a/b", "/a//b/", "a/./b", "a/../b", "./a.png", "a//b.png", "a/.",
             "\udcff.png", "café/x.png", " a .png", "a\\b.png", "..", "../x", ".//./", "a/b/"]
    assert [as_posix(name) for name in names] == [PurePosixPath(name).as_posix() for name in names]
    for value in (5, None, ["a.png"], {"a": 1}):
        with pytest.raises(TypeError):  # a metadata line that is "bad_metadata", as Path's TypeError made it
            as_posix(value)


def test_a_folder_holds_about_the_bytes_of_its_names_and_captions(tmp_path):
    """A list of (file, caption) tuples held about 255 bytes of Python objects a sample besides the text (3 GB at 12 million
    in each training process, copied page by page into each DataLoader worker as it touched their reference counts); now
    the text and two offsets. Measured with tracemalloc: what the dataset keeps after its scan."""
    root, n = tmp_path / "data", 2000
    (root / "0").mkdir(parents=True)
    text = 0
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            name, caption = f"0/{i:06d}.jpg", CAPTION.format(i=i)
            (root / name).write_bytes(b"x")  # the scan decodes nothing
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
            text += len(name) + len(caption)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        dataset = ImageFolderDataset(root, R)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(dataset) == n
    assert kept < text + 32 * n + 64 * 1024, kept / n  # was about 290 bytes a sample of ~115 bytes of text


def test_only_the_first_process_reads_the_files_for_the_fingerprint(model, tmp_path, monkeypatch):
    """Every process of a run reads the whole image folder (the sampler splits it), and each computed its fingerprint,
    reading 32 KiB of every file: N processes, N times the reads. With the run's broadcast (`share_fingerprints`) the first
    process computes it for all; the digest is the one a single process computes."""
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "data", 6)
    alone = TrainingBatches(str(folder), model, R, 2, seed=0).fingerprint()
    reads = Counter()
    real = imagefolder._file_sample_digest
    monkeypatch.setattr(imagefolder, "_file_sample_digest", lambda path: reads.update([Path(path).name]) or real(path))
    processes = [TrainingBatches(str(folder), model, R, 2, seed=0, rank=rank, world_size=2) for rank in range(2)]
    broadcast = []  # what the first process computed, as the run's broadcast gives it to the second

    def first(compute):
        broadcast.append(compute())
        return broadcast[-1]

    processes[0].share_fingerprints(first)
    processes[1].share_fingerprints(lambda compute: broadcast[-1])
    states = [p.state_dict() for p in processes]
    assert [s["fingerprint"] for s in states] == [alone, alone]
    assert reads == Counter(f"{i}.png" for i in range(6))  # each file once, by the first process
    for process, state in zip(processes, states):  # a resume checks it without reading them again
        process.load_state_dict(state)
    assert reads == Counter(f"{i}.png" for i in range(6))


def test_a_resume_on_unchanged_data_reads_no_file_size(model, tmp_path, monkeypatch):
    """A resume compared the checkpoint's digest with both the digest and the earlier sizes-only one, computing both: a stat
    of each of 12 million files in every process at every resume, for a digest that only a checkpoint of an earlier
    version holds. It is computed where the digest differs."""
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "data", 4)
    state = TrainingBatches(str(folder), model, R, 2, seed=0).state_dict()
    sized = []
    real = ImageFolderDataset.size_fingerprint
    monkeypatch.setattr(ImageFolderDataset, "size_fingerprint", lambda self: sized.append(1) or real(self))
    TrainingBatches(str(folder), model, R, 2, seed=0).load_state_dict(state)
    assert sized == []
    earlier = TrainingBatches(str(folder), model, R, 2, seed=0)
    earlier.load_state_dict(state | {"fingerprint": real(earlier.dataset)})  # an earlier version's checkpoint resumes
    assert sized == [1]


def test_the_validation_captions_are_read_without_decoding_the_images(model, tmp_path, monkeypatch):
    """A run's validation prompts are the data's first captions: each image was decoded (a 50-megapixel photo in seconds) to
    read its caption, in every process."""
    from tiny_models import write_captioned_images

    folder = write_captioned_images(tmp_path / "data", 6)
    batches = TrainingBatches(str(folder), model, R, 2, seed=0)
    decoded = []
    real = imagefolder.load_rgb
    monkeypatch.setattr(imagefolder, "load_rgb", lambda *args: decoded.append(args[0]) or real(*args))
    assert batches.first_captions(4) == [f"a red star number {i}" for i in range(4)]
    assert decoded == []


def test_the_workers_skip_events_are_kept_as_counts(model, tmp_path, monkeypatch):
    """Past NAMED_PER_REASON samples of a reason the DataLoader workers send their skips without a name, one event each, and
    the run kept every event for its whole length (millions at 5% grayscale images of 12 million, over epochs): now a count
    per reason, and the run reports the same."""
    from tiny_models import write_captioned_images

    monkeypatch.setattr(images_module, "NAMED_PER_REASON", 1)  # the forked worker inherits it
    folder = write_captioned_images(tmp_path / "data", 6)
    for i in range(6):
        Image.open(folder / f"{i}.png").convert("L").save(folder / f"{i}.png")
    batches = TrainingBatches(str(folder), model, R, 3, seed=0, num_workers=1)
    for _ in range(2):  # an epoch: one image named, five counted without a name
        next(batches)
    kept = len(pickle.dumps(batches._worker_skips))
    for _ in range(6):
        next(batches)
    assert len(pickle.dumps(batches._worker_skips)) == kept  # was: five more events an epoch
    counts, seen = batches.skipped_record()
    assert counts["converted_grayscale"] >= 1 + 5 * 4 and len([pair for pair in seen if pair[0] == "converted_grayscale"]) == 1


def test_skip_events_count_as_the_list_of_them_did():
    """`SkipCounter.with_counted` of the events kept as counts is what it was of the list of every event."""
    scan = SkipCounter()
    scan.add("no_caption", "a.png")
    stream = [("corrupt", "b.png"), ("converted_grayscale", ""), ("corrupt", "b.png"), ("no_caption", "a.png"),
              ("converted_grayscale", ""), ("corrupt", "c.png"), ("too_large", "")]
    events = SkipEvents()
    events += stream[:3]
    events += stream[3:]
    merged, listed = scan.with_counted(events), scan.with_counted(stream)
    assert merged.counts == listed.counts == {"no_caption": 1, "corrupt": 2, "converted_grayscale": 2, "too_large": 1}
    assert merged.seen == listed.seen and bool(events) and not SkipEvents()
