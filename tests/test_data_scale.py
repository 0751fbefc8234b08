"""The data commands at real sizes: what grows with the data does so linearly and only where it must. No timings: the work
is counted (files opened, images decoded, names kept) on small data where the old code did work per sample or per read."""

import hashlib
import json
import threading
from pathlib import Path

import PIL.ImageFile
from PIL import Image

from latent_consistency.cli import generate as generate_cli
from latent_consistency.data import imagefolder
from latent_consistency.data.images import NAMED_PER_REASON, SkipCounter
from latent_consistency.grids import save_png


def _folder(root: Path, n: int) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (i, 2 * i, 3)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a photo number {i}")
    return root


def test_fingerprint_is_the_digest_checkpoints_recorded(tmp_path, monkeypatch):
    """The fingerprint is hashed row by row, and its files read on threads a chunk at a time, without the JSON text of every
    sample in memory (about 2 GB at 12 million samples): the digest is the one checkpoints recorded, json.dumps of the
    whole list, in order across more than one chunk, so a run resumes on its unchanged data."""
    monkeypatch.setattr(imagefolder, "FINGERPRINT_CHUNK", 3)
    dataset = imagefolder.ImageFolderDataset(_folder(tmp_path / "data", 20), 8)
    stamps = [(caption, imagefolder._file_sample_digest(dataset.root / name)) for name, caption in dataset.samples]
    sizes = [(caption, (dataset.root / name).stat().st_size) for name, caption in dataset.samples]
    threads, dumped = set(), []
    real_digest, real_dumps = imagefolder._file_sample_digest, json.dumps
    monkeypatch.setattr(imagefolder, "_file_sample_digest", lambda path: threads.add(threading.current_thread().name) or real_digest(path))
    monkeypatch.setattr(imagefolder.json, "dumps", lambda value, **kw: dumped.append(len(value)) or real_dumps(value, **kw))
    fingerprint, size_fingerprint = dataset.fingerprint(), dataset.size_fingerprint()
    monkeypatch.undo()
    assert fingerprint == hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]
    assert size_fingerprint == hashlib.sha256(json.dumps(sizes).encode()).hexdigest()[:16]
    assert max(dumped) == 2  # one row at a time, never the list of all
    assert threads and all(name.startswith("fingerprint") for name in threads)  # the files read on the pool's threads


def test_skip_counter_names_a_bounded_number_of_samples():
    """A million images of which 5% are grayscale listed 50,000 paths in every checkpoint (the counter's `seen`): now the first
    NAMED_PER_REASON of a reason are named, each counting once however often it is read, and the rest are counted."""
    counter = SkipCounter(pending=[])
    for _epoch in range(2):
        for i in range(NAMED_PER_REASON + 5):
            counter.add("converted_grayscale", f"{i}.png")
    assert len(counter.seen) == NAMED_PER_REASON
    assert counter.counts["converted_grayscale"] == NAMED_PER_REASON + 2 * 5  # the named ones once, the others per read
    assert len([detail for _, detail in counter.take_pending() if detail]) == NAMED_PER_REASON
    restored = SkipCounter(counts=counter.counts.copy(), seen=set(counter.seen))  # a checkpoint's: still full
    restored.add("converted_grayscale", "new.png")
    assert ("converted_grayscale", "new.png") not in restored.seen and len(restored.seen) == NAMED_PER_REASON


def _generated(folder: Path, prompts: list[str], kept: int) -> list[dict]:
    """`lcm generate`'s files for the first `kept` of `prompts` in `folder`, with their records; the records of all."""
    folder.mkdir()
    records = [generate_cli.image_record(prompt, i, {"model": "m", "steps": 4}) for i, prompt in enumerate(prompts)]
    for i in range(kept):
        save_png(Image.new("RGB", (64, 64)), folder / generate_cli.image_filename(i, prompts[i]),
                 {generate_cli.RECORD_KEY: json.dumps(records[i])})
    return records


def test_skip_existing_reads_records_without_decoding_the_images(tmp_path, monkeypatch):
    """--skip-existing read each kept image's record through Pillow's `text`, which decodes the whole image to look for text
    after the pixels: 50,000 kept images of 1024 px were minutes before the first new one. The record is before them."""
    prompts = [f"a cat {i}" for i in range(6)]
    records = _generated(tmp_path / "out", prompts, kept=4)
    files, kept = generate_cli.output_files(str(tmp_path / "out"), prompts, skip_existing=True)
    loads = []
    real_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    generate_cli.check_kept(files, kept, records)
    assert kept == {0, 1, 2, 3} and loads == []
    assert generate_cli.read_record(files[2]) == records[2]


def test_skip_existing_lists_the_folder_once(tmp_path, monkeypatch):
    """Finding the images already in --out stat'ed each prompt's file name twice (exists, is_symlink): 100,000 stats for a
    prompt file of 50,000 lines, each a round trip on a network disk. The folder is listed once; only names it holds are
    checked."""
    prompts = [f"a dog {i}" for i in range(200)]
    _generated(tmp_path / "out", prompts, kept=3)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    checked = []
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: checked.append(self.name) or real_exists(self, **kw))
    files, kept = generate_cli.output_files(str(tmp_path / "out"), prompts, skip_existing=True)
    assert kept == {0, 1, 2}
    assert sorted(set(checked) - {"out"}) == sorted(files[i].name for i in kept)
