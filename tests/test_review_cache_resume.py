"""`lcm cache` resumed with inputs the first resume tests do not use: the same job spelled another way, an image folder whose
uncaptioned files changed while the cache was stopped, and a damaged file of a shard's first-seen captions."""

import json
import shutil

import pytest

from latent_consistency.models import load_diffusion_model
from test_cache_resume import images, killed, snapshot, write


@pytest.fixture(scope="module")
def model(tiny_sd):
    return load_diffusion_model(str(tiny_sd))


def without_source(cache) -> dict[str, bytes]:
    """The cache's files, its manifest without the `source` it records (what the command was given, spelled as given)."""
    files = snapshot(cache)
    manifest = json.loads(files.pop("manifest.json"))
    return files | {"manifest": {key: value for key, value in manifest.items() if key != "source"}}


@pytest.mark.parametrize("spelling", ["a trailing slash", "relative"])
def test_the_same_job_spelled_another_way_resumes(model, tmp_path, monkeypatch, spelling):
    """Was: `lcm cache --data images/` (as a shell completes a folder), stopped, then `--data images`, or a relative --data
    run again with its absolute path, started OUT.partial again ("another source"): hours of encoding lost for a spelling of
    the same folder. Now the rerun resumes and writes the uninterrupted cache (its manifest records the source as given)."""
    data = images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    first = {"a trailing slash": f"{data}/", "relative": "images"}[spelling]
    write(model, data, tmp_path / "whole")
    partial = killed(model, data, tmp_path / "cache", monkeypatch, source={"data": first})
    notes = []
    write(model, data, tmp_path / "cache", notes, source={"data": str(data)})
    assert notes == [f"resuming {partial} at sample 8 of 10 (2 shards written)"]
    assert without_source(tmp_path / "cache") == without_source(tmp_path / "whole")


def add_uncaptioned(data):
    for name in ("extra-1.png", "extra-2.png"):
        shutil.copy(data / "0.png", data / name)


def remove_uncaptioned(data):
    for name in ("extra-1.png", "extra-2.png"):
        (data / name).unlink()


@pytest.mark.parametrize("before, after", [(None, add_uncaptioned), (add_uncaptioned, remove_uncaptioned)])
def test_the_summary_of_a_resume_counts_the_folder_as_it_is_now(model, tmp_path, monkeypatch, before, after):
    """Images without a caption added to (or removed from) the folder while the cache was stopped: its samples, and so the
    job, are the same, and the cache resumes; the data's summary is the uninterrupted run's on the folder as it is now.
    Was: the record's counts replaced the rerun's scan, so two uncaptioned images added were not counted (and two removed
    still were); corrupt image 3, met in the reading before the stop, is counted once either way."""
    data = images(tmp_path / "images", 14, corrupt=(3,))
    if before:
        before(data)
    partial = killed(model, data, tmp_path / "cache", monkeypatch)
    after(data)
    notes = []
    resumed = write(model, data, tmp_path / "cache", notes)
    whole = write(model, data, tmp_path / "whole")
    assert notes == [f"resuming {partial} at sample 10 of 14 (2 shards written)"]
    assert resumed.skipped.summary() == whole.skipped.summary() == \
        ("skipped: corrupt=1, no_caption=2" if after is add_uncaptioned else "skipped: corrupt=1")
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")


@pytest.mark.parametrize("damage, why", [
    ("", "its file shard-00001.captions.json is unreadable"),
    ('{"a sun": 1, "a tree": 2}', "its file shard-00001.captions.json is unreadable"),
    ('["a star", "a tree"]', "its files of first-seen captions name a caption twice"),
])
def test_a_damaged_file_of_first_seen_captions_starts_again(model, tmp_path, monkeypatch, damage, why):
    """A shard's first-seen captions damaged after the kill (by hand, or a disk): empty, it was a JSONDecodeError's
    traceback; a JSON object of them, or a caption that an earlier shard saw first, was read as a caption table that
    paired later samples with other samples' captions, silently. Now OUT.partial is started again, saying why, and the
    cache is the uninterrupted one."""
    data = images(tmp_path / "images")
    write(model, data, tmp_path / "whole")
    partial = killed(model, data, tmp_path / "cache", monkeypatch)
    (partial / "shard-00001.captions.json").write_text(damage)
    notes = []
    write(model, data, tmp_path / "cache", notes)
    assert notes == [f"note: {partial} is started again: {why}"]
    assert snapshot(tmp_path / "cache") == snapshot(tmp_path / "whole")
