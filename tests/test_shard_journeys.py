"""Training on .tar shards as users make them with their own tools: img2dataset's output folder (00000.tar with KEY.jpg,
KEY.txt, KEY.json beside 00000_stats.json and 00000.parquet), webdataset's writers (.png/.webp, captions in .txt, .caption
or a .json's "caption"/"text"), keys with dots, samples without an image or a caption, a download interrupted in the last
shard, an empty tar, a tar of one sample, shards in subfolders, compressed shards, and a run killed with kill -9 and
resumed. Every usable sample is trained on, every skipped one is counted with its reason, a user error is one line."""

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latent_consistency.data.shards import ShardStream, expand_urls
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError

R = 8
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def image(value=(200, 30, 30), fmt: str = "PNG") -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (R + 4, R), value).save(data, fmt)
    return data.getvalue()


def write_shard(path, members, cut: int | None = None):
    """A tar of (name, bytes) members, as Python's tarfile writes it; `cut`: keep only its first `cut` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    path.write_bytes(data.getvalue()[:cut])
    return path


def img2dataset_sample(key: str, caption: str) -> list[tuple[str, bytes]]:
    """One sample as img2dataset writes it: the image, its caption, and a .json of the download's metadata."""
    meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success", "width": R + 4}
    return [(f"{key}.jpg", image((len(caption), 60, 90), "JPEG")), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]


def captions_of(stream: ShardStream, n: int = 60) -> list[str]:
    return [item["caption"] for item in itertools.islice(iter(stream), n)]


def test_an_img2dataset_folder_trains_on_every_usable_sample_and_counts_the_rest(tmp_path):
    """Beside the tars: img2dataset's _stats.json and .parquet; shard 1 has a sample without a caption and one without an
    image; the last shard's download was interrupted inside its third sample."""
    folder = tmp_path / "laion-subset"
    write_shard(folder / "00000.tar", [m for k in range(3) for m in img2dataset_sample(f"0000{k}", f"photo 0-{k}")])
    write_shard(folder / "00001.tar", [*img2dataset_sample("10000", "photo 1-0"),
                                       ("10001.jpg", image(fmt="JPEG")), ("10001.json", b'{"caption": null, "status": "success"}'),
                                       ("10002.txt", b"a caption without its image")])
    last = [m for k in range(3) for m in img2dataset_sample(f"2000{k}", f"photo 2-{k}")]
    full = write_shard(folder / "00002.tar", last).read_bytes()
    write_shard(folder / "00002.tar", last, cut=full.index(b"20002.jpg") + 700)
    for shard in range(3):
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    usable = {"photo 0-0", "photo 0-1", "photo 0-2", "photo 1-0", "photo 2-0", "photo 2-1"}

    stream = open_dataset(str(folder), R, seed=1)
    assert isinstance(stream, ShardStream) and len(stream.shards) == 3
    assert set(captions_of(stream, 80)) == usable
    assert dict(stream.skipped.counts) == {"no_caption": 1, "no_image": 1, "truncated_shard": 1}
    once = open_dataset(str(folder / "{00000..00002}.tar"), R)
    assert sorted(item["caption"] for item in once.samples_once()) == sorted(usable)  # each once, as evaluate reads them
    assert once.skipped.counts == stream.skipped.counts


def test_captions_in_dot_caption_members_are_read(tmp_path):
    """webdataset's writers name a caption KEY.caption as often as KEY.txt; it used to count as a sample without one."""
    shard = write_shard(tmp_path / "00000.tar", [("a.webp", image(fmt="WEBP")), ("a.caption", b"a red square")])
    stream = ShardStream(str(shard), R, shuffle_buffer=1, decode_threads=1)
    assert set(captions_of(stream, 4)) == {"a red square"} and not stream.skipped.counts
    assert [item["caption"] for item in stream.samples_once()] == ["a red square"]


def test_a_json_caption_is_its_caption_or_text_field_in_any_case(tmp_path):
    """img2dataset writes "caption": null where its caption column was empty, beside other tools' "text"; LAION's own
    column is "TEXT"."""
    shard = write_shard(tmp_path / "00000.tar", [
        ("a.png", image((1, 1, 1))), ("a.json", b'{"caption": null, "text": "from text"}'),
        ("b.png", image((2, 2, 2))), ("b.json", b'{"TEXT": "from LAION", "URL": "x"}'),
        ("c.png", image((3, 3, 3))), ("c.json", b'{"caption": "  ", "status": "success"}'),
    ])
    stream = ShardStream(str(shard), R, shuffle_buffer=1, decode_threads=1)
    assert set(captions_of(stream, 12)) == {"from text", "from LAION"}
    assert stream.skipped.counts == {"no_caption": 1}


def test_keys_with_dots_are_samples_of_their_own(tmp_path):
    """webdataset's key ends at the first dot, which made cat.01.jpg, cat.01.txt, cat.02.jpg, ... one sample keyed "cat"
    without a "jpg" member: a shard of such keys trained on nothing. A one-part extension keeps webdataset's key, so a
    sample's extra member with a dotted extension (dog.seg.png) stays in its sample."""
    shard = write_shard(tmp_path / "00000.tar", [
        ("photos/cat.01.jpg", image((10, 0, 0), "JPEG")), ("photos/cat.01.txt", b"cat one"),
        ("photos/cat.02.jpg", image((20, 0, 0), "JPEG")), ("photos/cat.02.json", b'{"caption": "cat two"}'),
        ("photos/cat.03.jpg", image((30, 0, 0), "JPEG")),
        ("dog.jpg", image((0, 40, 0), "JPEG")), ("dog.seg.png", image((0, 0, 0))), ("dog.txt", b"a dog"),
    ])
    stream = ShardStream(str(shard), R, shuffle_buffer=2, decode_threads=1)
    assert set(captions_of(stream, 30)) == {"cat one", "cat two", "a dog"}
    assert dict(stream.skipped.counts) == {"no_caption": 1}
    assert f"{shard}:photos/cat.03" in {detail for _, detail in stream.skipped.seen}
    assert [item["caption"] for item in stream.samples_once()] == ["cat one", "cat two", "a dog"]
    dog = next(item["image"] for item in ShardStream(str(shard), R).samples_once() if item["caption"] == "a dog")
    assert dog[1].mean() > dog[0].mean()  # the sample's image is dog.jpg (green), not its segmentation map (black)


def test_a_resumed_stream_over_dotted_keys_continues_exactly(tmp_path):
    members = [(f"img.{k:03d}.{ext}", image((k * 9, 0, 0)) if ext == "png" else f"caption {k}".encode())
               for k in range(7) for ext in ("png", "txt")]
    write_shard(tmp_path / "00000.tar", members[:8])
    write_shard(tmp_path / "00001.tar", members[8:])
    pattern = str(tmp_path / "0000{0,1}.tar")
    reference = list(itertools.islice(iter(ShardStream(pattern, R, seed=2, shuffle_buffer=3)), 20))
    stream = ShardStream(pattern, R, seed=2, shuffle_buffer=3)
    iterator = iter(stream)
    list(itertools.islice(iterator, 9))
    resumed = ShardStream(pattern, R, seed=2, shuffle_buffer=3)
    resumed.load_state_dict(stream.state_dict())
    after = list(itertools.islice(iter(resumed), 11))
    assert [item["caption"] for item in after] == [item["caption"] for item in reference[9:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(after, reference[9:]))
    assert len({item["caption"] for item in reference}) == 7


def test_a_resumed_stream_counts_what_was_skipped_before_the_resume(tmp_path):
    """Skips are found as shards are read: a run resumed from a checkpoint reported only those found after it, so its data
    summary left out a whole truncated shard or every sample without a caption read before the kill."""
    write_shard(tmp_path / "00000.tar", [("a.png", image((1, 1, 1))), ("a.txt", b"a"), ("b.png", image()), ("c.txt", b"c")])
    gray = io.BytesIO()
    Image.new("L", (R, R), 90).save(gray, "PNG")
    members = [("d.png", gray.getvalue()), ("d.txt", b"d"), ("e.png", image((5, 5, 5))), ("e.txt", b"e")]
    full = write_shard(tmp_path / "00001.tar", members).read_bytes()
    write_shard(tmp_path / "00001.tar", members, cut=full.index(b"e.txt"))  # a download cut before e.txt
    pattern = str(tmp_path / "*.tar")
    reference = ShardStream(pattern, R, seed=4, shuffle_buffer=2, decode_threads=1)
    list(itertools.islice(iter(reference), 30))
    stream = ShardStream(pattern, R, seed=4, shuffle_buffer=2, decode_threads=1)
    list(itertools.islice(iter(stream), 12))
    saved = io.BytesIO()
    torch.save(stream.state_dict(), saved)
    resumed = ShardStream(pattern, R, seed=4, shuffle_buffer=2, decode_threads=1)
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    list(itertools.islice(iter(resumed), 18))
    assert set(reference.skipped.counts) == {"no_caption", "no_image", "truncated_shard", "converted_grayscale"}
    assert resumed.skipped.counts == reference.skipped.counts and resumed.skipped.seen == reference.skipped.seen


def test_empty_and_one_sample_tars_and_upper_case_names_in_subfolders(tmp_path):
    """Shards in subfolders (several img2dataset runs in one folder) are read as an image folder's subfolders are;
    .TAR is a tar. A tar without members is no sample and no skip; a zero-byte file (a download that never started) is
    counted."""
    write_shard(tmp_path / "part-a" / "00000.TAR", [("k.png", image()), ("k.txt", b"the one sample")])
    write_shard(tmp_path / "part-b" / "00000.tar", [])
    (tmp_path / "part-b" / "00001.tar").write_bytes(b"")
    (tmp_path / "part-b" / "00001_stats.json").write_text("{}")
    stream = open_dataset(str(tmp_path), R)
    assert isinstance(stream, ShardStream) and len(stream.shards) == 3
    assert set(captions_of(stream, 5)) == {"the one sample"}  # with the default shuffle buffer of 1000 samples
    assert dict(stream.skipped.counts) == {"truncated_shard": 1}
    assert open_dataset(str(tmp_path / "part-a" / "00000.TAR"), R).shards == [str(tmp_path / "part-a" / "00000.TAR")]


def test_compressed_shards_are_refused_saying_to_decompress_them(tmp_path, tiny_sd, run_error):
    """webdataset reads .tar.gz; a position here is a byte offset that only decompressing from the start reaches, so they
    are refused before a run starts, in one line that says what to do, instead of "cannot read data spec"."""
    folder = tmp_path / "gz"
    write_shard(folder / "00000.tar", [("k.png", image()), ("k.txt", b"a cat")])
    (folder / "00000.tar").rename(folder / "00000.tar.gz")
    for spec in (str(folder), str(folder / "00000.tar.gz"), str(folder / "{00000..00000}.tgz"), str(folder / "*.tar.gz")):
        with pytest.raises(UserError, match="compressed shard.*decompress"):
            open_dataset(spec, R)
    with pytest.raises(UserError, match="compressed shard"):
        expand_urls([folder / "00000.tar.gz"])
    out = tmp_path / "run"
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(folder), "--out", str(out)])
    assert code == 2 and len(err.splitlines()) == 1 and "gunzip" in err, err
    assert not (out / "checkpoints").exists()


def test_the_first_captions_of_shards_are_their_validation_prompts(tmp_path):
    """A run without --validation-prompts shows its data's first captions; a shard stream had none to give, so a run on
    shards (or with --eval-data shards) drew no validation grid at all."""
    write_shard(tmp_path / "00000.tar", [("a.jpg", b"not decoded here"), ("a.txt", b"first"), ("b.txt", b"no image"),
                                         ("c.png", image()), ("c.caption", b"second")])
    write_shard(tmp_path / "00001.tar", [("d.png", image()), ("d.txt", b"third")])
    stream = ShardStream(str(tmp_path / "*.tar"), R)
    assert stream.first_captions(2) == ["first", "second"]
    assert stream.first_captions(8) == ["first", "second", "third"]
    assert not stream.skipped.counts and stream.state_dict()["draws"] == 0  # the stream itself is untouched


@pytest.mark.slow
def test_kill_9_and_resume_on_img2dataset_shards_is_bitwise_identical(tiny_sd, tmp_path):
    """The data position of a shard run (draws, offset, shuffle buffer, decode queue) survives kill -9: the resumed run
    ends bit for bit where the uninterrupted one does, on shards with dotted keys, skipped samples and a truncated tar."""
    folder = tmp_path / "shards"
    for shard in range(3):
        samples = [m for k in range(4) for m in img2dataset_sample(f"{shard}.{k:04d}", f"photo {shard}-{k}")]
        write_shard(folder / f"{shard:05d}.tar", [*samples, (f"{shard}.nocap.jpg", image(fmt="JPEG"))],
                    cut=None if shard < 2 else 9000)
    args = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(folder), "--steps", "6",
            "--checkpoint-every", "2", "--keep-checkpoints", "10", "--batch-size", "4", "--lr", "1e-3"]
    cli = [sys.executable, "-m", "latent_consistency.cli"]
    reference = tmp_path / "reference"
    done = subprocess.run([*cli, *args, "--out", str(reference)], env=ENV, check=True, capture_output=True, text=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, *args, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000002").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lcm").exists(), "the run finished before it could be killed"
    resumed = subprocess.run([*cli, *args, "--out", str(killed), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = [line for line in resumed.stdout.splitlines() if line.startswith("data: ")]
    assert summary and "no_caption=" in summary[0] and "truncated_shard=" in summary[0]  # the whole run's, kill or no kill
    assert summary == [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    last = sorted((reference / "checkpoints").iterdir())[-1].name
    for name in ("student.safetensors", "target.safetensors"):
        ref, res = load_file(str(reference / "checkpoints" / last / name)), load_file(str(killed / "checkpoints" / last / name))
        assert ref.keys() == res.keys() and all(torch.equal(ref[k], res[k]) for k in ref), name
