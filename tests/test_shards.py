"""Webdataset shards: img2dataset layout, conversions and skips, truncated shards, resampling, exact resume."""

import io
import itertools
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from latent_consistency.data.shards import ShardStream, _expand_braces, expand_urls
from latent_consistency.errors import UserError

R = 8


def image_bytes(mode: str, value, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (R + 4, R), value).save(buffer, fmt)
    return buffer.getvalue()


def write_shard(path, samples, cut: int | None = None):
    """samples: (key, {extension: bytes}); cut: keep only the first `cut` bytes of the tar."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.write_bytes(data if cut is None else data[:cut])
    return path


def good(shard: int, count: int):
    """`count` usable samples whose captions name the shard, with colours telling them apart."""
    return [
        (f"{shard:02d}{k:03d}", {"jpg": image_bytes("RGB", (10 * k, 20 * shard, 7), "JPEG"), "txt": f"s{shard}-{k}".encode()})
        for k in range(count)
    ]


@pytest.fixture
def shards(tmp_path):
    """Shard 0: plain; shard 1: every problem; shard 2: truncated inside its fourth sample's image."""
    write_shard(tmp_path / "00000.tar", good(0, 5))
    write_shard(
        tmp_path / "00001.tar",
        [
            ("gray", {"png": image_bytes("L", 90), "json": json.dumps({"caption": "s1-gray", "url": "x"}).encode()}),
            ("rgba", {"png": image_bytes("RGBA", (0, 0, 0, 0)), "txt": b"s1-rgba"}),
            ("deep", {"png": image_bytes("I;16", 65535), "txt": b"s1-deep"}),
            ("corrupt", {"jpg": b"\xff\xd8\xff not a jpeg", "txt": b"s1-corrupt"}),
            ("nocap", {"jpg": image_bytes("RGB", (1, 2, 3), "JPEG"), "json": b'{"caption": ""}'}),
            ("noimage", {"txt": b"s1-noimage", "json": b"{}"}),
            ("badjson", {"png": image_bytes("RGB", (0, 0, 0)), "json": b"{oops"}),
            ("textjson", {"png": image_bytes("RGB", (9, 9, 9)), "json": b'{"text": "s1-text"}'}),
        ],
    )
    full = write_shard(tmp_path / "00002.tar", good(2, 6)).read_bytes()
    cut = full.index(b"02003.jpg") + 512 + 100  # the header of 02003.jpg plus 100 bytes of its data
    write_shard(tmp_path / "00002.tar", good(2, 6), cut=cut)
    return str(tmp_path / "{00000..00002}.tar")


def take(stream_or_iterator, n):
    return list(itertools.islice(stream_or_iterator, n))


def test_samples_are_decoded_converted_and_problems_counted(shards):
    stream = ShardStream(shards, R, seed=0, shuffle_buffer=4, decode_threads=2)
    items = take(iter(stream), 150)
    by_caption = {item["caption"]: item["image"] for item in items}
    usable = {f"s0-{k}" for k in range(5)} | {"s1-gray", "s1-rgba", "s1-deep", "s1-text"} | {f"s2-{k}" for k in range(3)}
    assert set(by_caption) == usable  # the truncated shard's complete samples are used, then it stops
    for image in by_caption.values():
        assert image.shape == (3, R, R) and image.dtype == torch.float32
    assert torch.allclose(by_caption["s1-rgba"], torch.ones(3, R, R))  # transparent -> white
    assert torch.allclose(by_caption["s1-deep"], torch.ones(3, R, R))  # 16-bit full scale -> white
    gray = by_caption["s1-gray"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    counts = stream.skipped.counts
    for reason in ("corrupt", "no_caption", "no_image", "truncated_shard", "converted_grayscale", "converted_alpha"):
        assert counts[reason] > 0, reason
    assert "no_caption=" in stream.skipped.summary() and "truncated_shard=" in stream.skipped.summary()


def test_captions_are_utf8_with_or_without_a_bom_and_others_are_skipped(tmp_path):
    """A byte-order mark is not part of a caption; a caption that is not UTF-8 (Latin-1, a JSON-escaped lone surrogate)
    is skipped and counted, not trained on as replacement characters."""
    write_shard(tmp_path / "00000.tar", [
        ("bom", {"png": image_bytes("RGB", (1, 1, 1)), "txt": "\ufeffs-bom".encode()}),
        ("jsonbom", {"png": image_bytes("RGB", (2, 2, 2)), "json": "\ufeff".encode() + b'{"caption": "s-jsonbom"}'}),
        ("latin", {"png": image_bytes("RGB", (3, 3, 3)), "txt": b"caf\xe9"}),
        ("surrogate", {"png": image_bytes("RGB", (4, 4, 4)), "json": b'{"caption": "x\\ud800"}'}),
        ("plain", {"png": image_bytes("RGB", (5, 5, 5)), "txt": "s-caf\u00e9".encode()}),
    ])
    stream = ShardStream(str(tmp_path / "00000.tar"), R, seed=0, shuffle_buffer=1, decode_threads=1)
    captions = {item["caption"] for item in take(iter(stream), 30)}
    assert captions == {"s-bom", "s-jsonbom", "s-caf\u00e9"}
    assert stream.skipped.counts["bad_caption"] == 2


def test_the_stream_is_seeded_and_shuffled(shards):
    def captions(seed):
        return [item["caption"] for item in take(iter(ShardStream(shards, R, seed=seed, shuffle_buffer=4)), 30)]

    assert captions(0) == captions(0)
    assert captions(0) != captions(1)
    first = captions(0)
    assert len(set(first)) > 5 and first != sorted(first)


@pytest.mark.parametrize("stop", [1, 7, 23])
def test_resume_continues_with_exactly_the_samples_an_uninterrupted_stream_gives(shards, stop):
    reference = take(iter(ShardStream(shards, R, seed=3, shuffle_buffer=5, decode_threads=2)), stop + 25)
    stream = ShardStream(shards, R, seed=3, shuffle_buffer=5, decode_threads=2)
    iterator = iter(stream)
    take(iterator, stop)
    saved = io.BytesIO()
    torch.save(stream.state_dict(), saved)
    take(iterator, 3)  # the interrupted run went on a little before it died
    resumed = ShardStream(shards, R, seed=3, shuffle_buffer=5, decode_threads=3)  # thread count may differ
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    after = take(iter(resumed), 25)
    assert [item["caption"] for item in after] == [item["caption"] for item in reference[stop:]]
    for got, expected in zip(after, reference[stop:]):
        assert torch.equal(got["image"], expected["image"])


def test_a_new_iterator_over_the_same_stream_continues_where_the_last_stopped(shards):
    reference = [item["caption"] for item in take(iter(ShardStream(shards, R, seed=1, shuffle_buffer=3)), 20)]
    stream = ShardStream(shards, R, seed=1, shuffle_buffer=3)
    first = [item["caption"] for item in take(iter(stream), 8)]
    second = [item["caption"] for item in take(iter(stream), 12)]
    assert first + second == reference


def test_dataloader_batches_and_resume(shards):
    stream = ShardStream(shards, R, seed=0, shuffle_buffer=4)
    loader = iter(DataLoader(stream, batch_size=4))
    next(loader)
    state = stream.state_dict()
    expected = next(loader)
    resumed = ShardStream(shards, R, seed=0, shuffle_buffer=4)
    resumed.load_state_dict(state)
    batch = next(iter(DataLoader(resumed, batch_size=4)))
    assert batch["image"].shape == (4, 3, R, R)
    assert batch["caption"] == expected["caption"] and torch.equal(batch["image"], expected["image"])


def test_ranks_read_disjoint_deterministic_streams(tmp_path):
    for shard in range(4):
        write_shard(tmp_path / f"{shard:05d}.tar", good(shard, 3))
    pattern = str(tmp_path / "*.tar")

    def shard_ids(rank):
        stream = ShardStream(pattern, R, seed=0, shuffle_buffer=2, rank=rank, world_size=2)
        return [item["caption"].split("-")[0] for item in take(iter(stream), 24)]

    assert set(shard_ids(0)) == {"s0", "s2"} and set(shard_ids(1)) == {"s1", "s3"}
    assert shard_ids(1) == shard_ids(1)
    state = ShardStream(pattern, R, rank=1, world_size=2).state_dict()
    with pytest.raises(UserError, match="number of processes"):
        ShardStream(pattern, R, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(UserError, match="4 shard.*5 processes: each reads shards of its own"):
        ShardStream(pattern, R, rank=0, world_size=5)


def test_shards_that_split_unevenly_over_processes_are_noted(tmp_path):
    # was: 3 shards on 2 processes trained on one shard's samples twice as often as the others', without a word
    for shard in range(4):
        write_shard(tmp_path / f"{shard:05d}.tar", good(shard, 3))
    four, three = str(tmp_path / "*.tar"), str(tmp_path / "{00000..00002}.tar")
    assert ShardStream(four, R, rank=1, world_size=2).uneven_note() is None
    assert ShardStream(three, R).uneven_note() is None  # one process reads them all
    note = ShardStream(three, R, rank=1, world_size=2).uneven_note()
    assert note.startswith("3 shards over 2 processes: 1 of the processes read 2 shards, the others 1") and "multiple of 2" in note


def test_nothing_usable_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "a.tar", [("k", {"jpg": image_bytes("RGB", (0, 0, 0), "JPEG")})])
    write_shard(tmp_path / "b.tar", [("k", {"jpg": b"corrupt", "txt": b"caption"})])
    (tmp_path / "c.tar").write_bytes(b"")
    with pytest.raises(UserError, match="no usable sample.*no_caption=1"):
        next(iter(ShardStream([tmp_path / "a.tar", tmp_path / "c.tar"], R, shuffle_buffer=4)))
    with pytest.raises(UserError, match="no usable sample.*corrupt="):
        next(iter(ShardStream(str(tmp_path / "b.tar"), R, shuffle_buffer=4)))


def test_iterating_in_a_dataloader_worker_is_refused(shards, monkeypatch):
    # As inside DataLoader(num_workers > 0); a real worker process costs a 5 s shutdown after the error.
    monkeypatch.setattr("latent_consistency.data.shards.get_worker_info", lambda: object())
    with pytest.raises(UserError, match="num_workers to 0"):
        next(iter(ShardStream(shards, R)))


def test_url_expansion(tmp_path):
    assert _expand_braces("d/{00008..00010}.tar") == ["d/00008.tar", "d/00009.tar", "d/00010.tar"]
    assert _expand_braces("{a,b{1..2}}-{x,y}") == ["a-x", "a-y", "b1-x", "b1-y", "b2-x", "b2-y"]
    assert _expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    for name in ("00000.tar", "00001.tar"):
        write_shard(tmp_path / name, good(0, 1))
    assert expand_urls(str(tmp_path / "*.tar")) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert expand_urls([tmp_path / "00001.tar", str(tmp_path / "0000{0,1}.tar")]) == [
        str(tmp_path / "00001.tar"), str(tmp_path / "00000.tar")
    ]
    with pytest.raises(UserError, match="00002.tar does not exist"):
        expand_urls(str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(UserError, match="no shard matches"):
        expand_urls(str(tmp_path / "*.tgz"))
