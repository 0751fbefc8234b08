"""Input files as they arrive from the internet or a scraper, built to do harm: a shard whose few KiB claim gigabytes, a
named pipe or a device called x.png or x.tar, a metadata.jsonl that names the machine's other images or a name longer
than the disk takes. Each is skipped and counted like any unusable sample, or refused in one line; none makes a run hang,
run out of memory, or train on files from outside its data."""

import io
import json
import os
import tarfile
import threading

import pytest

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import SkipCounter, load_rgb
from latent_consistency.data.shards import ShardStream, expand_urls
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError
from test_own_data_inputs import R, captioned_png, png_bytes, write_shard

# What a sparse member claims: enough to tell reading it from not, small enough that the old code survived reading it
CLAIMED = 64 * 2**20


def sparse_member_shard(path):
    """A shard whose sample "big" has an image member in GNU's sparse format (PAX headers, version 0.1), one hole of
    CLAIMED bytes and no data: 10 KiB on disk, tar's smallest. Sample "ok" after it is an ordinary one."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("big.png")
        info.pax_headers = {"GNU.sparse.map": f"{CLAIMED},0", "GNU.sparse.size": str(CLAIMED)}
        archive.addfile(info, io.BytesIO())
        for name, payload in (("big.txt", b"a sparse image"), ("ok.png", png_bytes()), ("ok.txt", b"a red square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as archive:  # the shard is what the test means: tarfile reads the member as sparse and huge
        big = archive.getmember("big.png")
        assert big.issparse() and big.size == CLAIMED and os.path.getsize(path) <= 10 * 2**10
    return path


def test_a_sparse_shard_member_is_skipped_not_read_to_its_claimed_size(tmp_path):
    """Was: reading the member allocated the size it claims (a 10 KiB shard of GNU tar --sparse cost 3.3 GB of memory; a
    claim of 100 GB killed the run), then counted the zeros as a corrupt image. Now the sample is skipped unread."""
    shard = sparse_member_shard(tmp_path / "00000.tar")
    once = ShardStream([shard], R)
    assert [sample["caption"] for sample in once.samples_once()] == ["a red square"]
    assert dict(once.skipped.counts) == {"sparse_member": 1}
    stream = ShardStream([shard], R, shuffle_buffer=1, decode_threads=1)
    samples = iter(stream)
    assert {next(samples)["caption"] for _ in range(4)} == {"a red square"}
    samples.close()
    assert dict(stream.skipped.counts) == {"sparse_member": 1}


def test_tar_members_that_are_links_devices_or_outside_paths_are_never_followed(tmp_path):
    """A symlink, hard link or device member is no image (counted); names such as /etc/x or ../../y are only keys: nothing
    is extracted, so they write nothing anywhere."""
    with tarfile.open(tmp_path / "00000.tar", "w") as archive:
        for name, kind in (("s.png", tarfile.SYMTYPE), ("h.png", tarfile.LNKTYPE), ("c.png", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            archive.addfile(info)
            caption = tarfile.TarInfo(name.replace(".png", ".txt"))
            caption.size = 4
            archive.addfile(caption, io.BytesIO(b"link"))
        for name, payload in (("/etc/x.png", png_bytes()), ("/etc/x.txt", b"abs"), ("../../y.png", png_bytes()),
                              ("../../y.txt", b"up")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    stream = ShardStream([tmp_path / "00000.tar"], R)
    assert [sample["caption"] for sample in stream.samples_once()] == ["abs", "up"]
    assert dict(stream.skipped.counts) == {"no_image": 3}
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before and sorted(os.listdir(tmp_path)) == ["00000.tar"]


def test_a_pipe_or_folder_among_the_shards_is_refused_in_one_line_not_read(tmp_path):
    """Was: a glob's match was opened whatever it was (a named pipe called 01.tar: the run waited for a writer forever),
    and a pipe in a folder of shards was called missing ("shard ... does not exist")."""
    write_shard(tmp_path / "00.tar", [("a.png", png_bytes()), ("a.txt", b"a red square")])
    os.mkfifo(tmp_path / "01.tar")
    with pytest.raises(UserError, match=r"01\.tar, matched by .*\*\.tar, is not a file"):
        expand_urls(str(tmp_path / "*.tar"))
    with pytest.raises(UserError, match=r"01\.tar is not a file"):
        open_dataset(str(tmp_path), R)
    os.unlink(tmp_path / "01.tar")
    (tmp_path / "01.tar").mkdir()
    with pytest.raises(UserError, match=r"01\.tar, matched by .*, is not a file"):
        expand_urls(str(tmp_path / "*.tar"))


def finishes(read, pipe) -> bool:
    """Whether `read()` returns, on a thread, within a minute (it takes milliseconds). A read still blocked then in opening
    the named pipe `pipe` is released (its writing end opened and closed: it reads an empty file), so that the test fails
    instead of hanging."""
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(60)
    if not thread.is_alive():
        return True
    os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    thread.join()
    return False


def test_a_pipe_or_device_named_like_an_image_is_counted_not_opened(tmp_path):
    """Was: `lcm evaluate --reference FOLDER` (and a latent cache, a run) opened every x.png it found; a named pipe called
    x.png blocked it forever, and a device was decoded (/dev/zero: read until it failed). Now it is counted as missing."""
    from latent_consistency.cli.evaluate import read_reference

    captioned_png(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink(os.devnull, tmp_path / "null.png")
    counter = SkipCounter()
    assert load_rgb(tmp_path / "null.png", R, counter) is None and dict(counter.counts) == {"missing_file": 1}
    images = []
    assert finishes(lambda: images.extend(read_reference(str(tmp_path), R, 10)), tmp_path / "pipe.png"), "a pipe blocked it"
    assert len(images) == 1 and tuple(images[0].shape) == (3, R, R)


def test_metadata_naming_files_outside_the_folder_is_skipped_and_counted(tmp_path):
    """Was: a metadata.jsonl downloaded with a dataset could name /home/me/Pictures/id.jpg or ../../private.png, and the run
    trained on it (a shared model can give its training images back). Hugging Face imagefolder reads its folder only."""
    data, elsewhere = tmp_path / "data", captioned_png(tmp_path / "private" / "me.png")
    captioned_png(data / "in" / "ok.png")
    lines = [{"file_name": "in/ok.png", "text": "inside"}, {"file_name": str(elsewhere), "text": "absolute"},
             {"file_name": "../private/me.png", "text": "up"}, {"file_name": "in/../../private/me.png", "text": "down and up"},
             {"file_name": "in/../in/ok.png", "text": "down and up inside"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = ImageFolderDataset(data, R)
    assert [caption for _, caption in dataset.samples] == ["inside", "down and up inside"]
    assert dict(dataset.skipped.counts) == {"outside_folder": 3}


def test_a_metadata_file_name_too_long_for_the_disk_is_one_missing_file_not_the_end_of_the_data(tmp_path):
    """Was: one metadata line naming a file of 5000 characters raised "File name too long" for the whole folder, where a
    line naming any other missing file is skipped and counted."""
    captioned_png(tmp_path / "ok.png")
    lines = [{"file_name": "ok.png", "text": "a red square"}, {"file_name": "x" * 5000 + ".png", "text": "long"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = ImageFolderDataset(tmp_path, R)
    assert dataset.samples == [("ok.png", "a red square")] and dict(dataset.skipped.counts) == {"missing_file": 1}
