"""The latent cache: a dataset encoded once into latents and text embeddings, D_z = {E(x)} (Section 4.3).

On disk (safetensors, no pickles):

    manifest.json              written last: a folder without it is not a cache
    captions.safetensors       text_embeddings [U,L,D] (one per distinct caption), uncond_embedding [L,D]
                               (the embedding of ""), caption_bytes [B] (the caption strings' UTF-8, end to end) and
                               caption_offsets [U+1] (caption u is caption_bytes[offsets[u]:offsets[u+1]])
    shard-00000.safetensors    latents [n,C,h,w] (scaled: z = E(x), see `models.LatentCodec`),
    ...                        caption_index [n] (rows of text_embeddings), key_bytes [K] and key_offsets [n+1] (sample i's
                               source key, key_bytes[offsets[i]:offsets[i+1]], in a cache whose manifest has SOURCE_KEYS)

Each sample's source key is the name a held-out split of the data it was written from hashes for it (`Holdout`): an image
folder's file name (relative to the folder), a .tar shard's name, a registered dataset's item index. A cache's held-out
split (--eval-fraction) hashes it too, so that it holds out whole images (every caption line of one), and the very images
the data's own split holds out; a cache written before the keys (none recorded) is split by sample index, with a note.

A captions-only cache (`write_latent_cache(captions_only=True)`, `lcm cache --captions-only`; CAPTIONS_ONLY true in its
manifest) has no text_embeddings or uncond_embedding in its captions file: a run encodes each micro-batch's captions and
∅ with its own model, as it does an image folder's (diffusers' training scripts encode captions in the loop too).
LAION's captions are all distinct, and a full cache of them is ~80 % text embeddings: in SD 1.5 a caption's is 77x768
float32 (231 KiB), a 512 px sample's latents 4x64x64 (64 KiB).

Captions repeat in a captioned toy dataset, so each distinct caption is encoded and stored once. The files are read
memory-mapped (`_read_tensors`): a cache of LAION size (650K samples of SD 1.5 at 512 px, ~190 GB in float32) is never
copied into memory, and its pages come from the OS page cache, shared by every training process on the machine. The
caption strings too (`CaptionTable`), decoded one at a time where a sample's is asked for: a cache of format
HEADER_CAPTIONS (written before) held them as JSON in the captions file's header, which safetensors refuses past 100 MB
(about 12M captions, LAION-Aesthetics' size) and which every process parsed whole into strings; it is still read.

A cache is written in `<cache>.partial` (marked PARTIAL_MARK) and renamed when whole. Beside each shard written there
lies the file of the captions first seen in it, and PROGRESS records the whole shards and where the reading of the data
got to, so that a rerun of the same job after a kill goes on from its last whole shard (`write_latent_cache`). Encoding
LAION is hours: a kill (Ctrl-C, a scheduler's, a full disk) cost them all.

The manifest records what made the cache's contents (ENCODERS): a digest of the VAE's weights (the latents) and of each
text encoder's (the text embeddings; a captions-only cache records the VAE's alone, as no text encoder made any of it).
A run whose model has another VAE or text encoder is refused (`LatentCache.check_encoders`), where comparing shapes and
the VAE's scaling factor let a cache of another model of the same shapes through. The UNet (or transformer) is not
among them: the cache serves every model that shares the VAE and text encoders, as each fine-tune of SD 1.5 that kept
its VAE and CLIP does; a captions-only cache, every model that shares the VAE.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np
import torch
from safetensors.torch import save_file

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset, hash_json_list
from latent_consistency.data.images import SkipCounter, SkipEvents
from latent_consistency.data.shards import CAPTION_MEMBERS, OncePosition, ShardStream
from latent_consistency.data.spec import SCHEMES, canonical_spec
from latent_consistency.data.workers import read_batches
from latent_consistency.errors import UserError
from latent_consistency.hub import check_hub_id, given_name
from latent_consistency.models import DiffusionModel, LatentCodec, load_component
from latent_consistency.outputs import check_partial, is_empty_folder, move_into_place, partial_folder, permit_as_umask, start_partial, write_json_atomic
from latent_consistency.outputs import written as naming_failures
from latent_consistency.progress import progress_bar
from latent_consistency.prompts import truncated_prompts

FORMAT = "latent-cache/2"
HEADER_CAPTIONS = "latent-cache/1"  # the earlier format: the caption strings as JSON in the captions file's metadata
MANIFEST = "manifest.json"
CAPTIONS = "captions.safetensors"
PARTIAL_MARK = ".lcm-latent-cache"  # in `<cache>.partial` while it is written
PROGRESS = "progress.json"  # in `<cache>.partial`: its whole shards and where the reading of the data got to (`_Written`)
CAPTIONS_PER_WRITE = 1 << 16  # caption strings joined into one write of the captions file
# A cache of at most this many bytes of latents and text embeddings is small: it is scanned whole for NaN and infinity when
# read and moved whole to the training device, once (the built-in world's: 20k samples of 8x8x4 latents, a few MB). A larger
# one stays memory-mapped: each micro-batch is gathered on the CPU, checked, and only it moves to the device.
SMALL_CACHE_BYTES = 1 << 30
FINGERPRINT_ROWS = 1 << 14  # samples fed to a fingerprint's digest at a time
# The tensors of each file as `write_latent_cache` writes them: safetensors' dtype name and number of dimensions
LAYOUT = {"latents": ("F32", 4), "caption_index": ("I64", 1), "text_embeddings": ("F32", 3), "uncond_embedding": ("F32", 2),
          "caption_bytes": ("U8", 1), "caption_offsets": ("I64", 1), "key_bytes": ("U8", 1), "key_offsets": ("I64", 1)}
DTYPES = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}
TABLE = ("text_embeddings", "uncond_embedding")
CAPTION_TENSORS = ("caption_bytes", "caption_offsets")
SOURCE_KEYS = "source_keys"  # in the manifest and a job: true where each shard holds its samples' source keys (`_SourceKeys`)
KEY_TENSORS = ("key_bytes", "key_offsets")
CAPTIONS_ONLY = "captions_only"  # in the manifest and a job: true where the cache holds no text embeddings (`captions_only`)
JOB = "job"  # in the manifest: the job that wrote the cache (`_job`), which a rerun compares with its own (`recorded_job`)
ENCODERS = "encoders"  # in the manifest: {part: digest} of the parts that made the cache (`LatentCache.check_encoders`)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # a pipeline folder's text encoders (SDXL's second makes the pooled one)
# Each part ENCODERS names, as a note or an error names it, and what of the cache it made
PARTS = {"vae": ("VAE", "latents"), "text_encoder": ("text encoder", "text embeddings"),
         "text_encoder_2": ("second text encoder", "text embeddings")}


def taken_folder(out_dir: Path) -> str:
    """Why a cache is not written into `out_dir`, a folder that holds files but no MANIFEST (a whole cache there is checked
    against the job instead: `recorded_job`, `_same_job`)."""
    return f"latent cache folder {out_dir} already exists; remove it or pick another folder (an empty one is used)"


def recorded_job(out_dir: Path) -> dict:
    """The job (`_job`) that wrote the whole cache at `out_dir`, as its MANIFEST records it (JOB), for a rerun to compare
    with its own (`_same_job`): a UserError, keeping the cache, where the manifest records none (an earlier version of lcm
    wrote it, or it is not a latent cache's). Reads the manifest alone: `lcm cache` calls it before the model loads."""
    try:
        job = json.loads((out_dir / MANIFEST).read_bytes()).get(JOB)
    except (OSError, ValueError, AttributeError):
        job = None
    if not isinstance(job, dict) or not all(part in job for part in _JOB_PARTS):
        raise UserError(f"latent cache folder {out_dir} already exists and its {MANIFEST} records no job that wrote it (an earlier "
                        "version of lcm wrote it, or it is not a latent cache's), so a rerun cannot tell whether it is this one's; "
                        "it is kept: pick another folder (--out) to cache again")
    return job


def _same_job(out_dir: Path, recorded: dict, job: dict, prompts) -> int:
    """The number of samples of the whole cache at `out_dir`, written by `recorded` (`recorded_job`) where that is `job`
    (`_other_part`, as a rerun compares a `<cache>.partial`'s) and, in a full cache, its text encoders' digests (ENCODERS)
    are those of `prompts`; else a UserError naming what differs, keeping the cache. Data without an identity
    (`_job`'s None) is never the same job."""
    if job["data"] is None:
        raise UserError(f"latent cache folder {out_dir} already exists, a whole latent cache, and this call's data has no identity "
                        "to compare with its job's (only an image folder, webdataset shards or a registered dataset has); it is kept: "
                        "pick another folder (--out) to cache this one")
    manifest, part, why = _read_manifest(out_dir), _other_part(recorded, job), None
    if part is not None:
        was, now = recorded[part], job[part]
        if isinstance(was, dict) and isinstance(now, dict):  # source, data: the keys they differ in
            keys = [key for key in {**was, **now} if was.get(key) != now.get(key)]
            was, now = ({key: value.get(key) for key in keys} for value in (was, now))
        what = _data_part(job) if part == "data" else _JOB_PARTS[part]
        why = f"it was written with another {what}: its {MANIFEST} records {_shown(was)}, this call {_shown(now)}"
    elif not job[CAPTIONS_ONLY]:
        digests = manifest.get(ENCODERS) if isinstance(manifest.get(ENCODERS), dict) else {}
        other = [name for name, encoder in _prompt_encoders(prompts).items() if digests.get(name) != _weights_digest(encoder)]
        why = f"it was written with another {PARTS[other[0]][0]} (other weights)" if other else None
    if why is not None:
        raise UserError(f"latent cache folder {out_dir} already exists, a whole latent cache of another job ({why}); it is kept: "
                        "pick another folder (--out) to cache this one")
    return manifest["num_samples"]


def _shown(value) -> str:
    """A part of a job as a message shows it: a dict's keys and values (data /images/a, resolution 512), else the value."""
    return ", ".join(f"{key} {item}" for key, item in value.items()) if isinstance(value, dict) else str(value)


@torch.no_grad()
def write_latent_cache(
    dataset,
    out_dir: str | Path,
    codec: LatentCodec,
    prompts,
    source: dict,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    shard_size: int = 8192,
    num_workers: int = 0,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
    captions_only: bool = False,
) -> Path:
    """Encode each usable sample of `dataset` (items {"image" in [-1, 1], "caption"}; an image folder, webdataset shards or a
    map-style dataset, `UsableBatches`) once into a cache at `out_dir`: latents with `codec`, each distinct caption and ∅
    once with the prompt encoder `prompts` (`models.DiffusionModel.prompts`; an SDXL condition carries the images' size as
    its micro-conditioning).

    `source` (e.g. dataset name, split, resolution, seed) is recorded in the manifest. The folder is written as
    `<out_dir>.partial` and renamed when complete, onto an empty `out_dir` (a folder a user made for it, or a link to one:
    `outputs.move_into_place`) or into its place. A call that finds a `<out_dir>.partial` of the same job, killed part way
    (an image folder, webdataset shards or a registered dataset that `source["data"]` names, read with the same `source`,
    VAE, batch and shard size), goes on from its last whole shard (`_resumable`) and writes the very cache an
    uninterrupted call writes; any other is started again. A call that finds at `out_dir` the whole cache of the same job
    (its manifest's JOB, compared as a `.partial`'s is, and its text encoders' digests) writes nothing and says so: a
    pipeline run again after the cache finished goes on; a whole cache of another job, or one whose manifest records no
    job, is a UserError that keeps it (`recorded_job`, `_same_job`). `say`
    prints its one-line notes (resuming, or why not), to stderr by default. The manifest records the digests (ENCODERS) of the
    VAE's and text encoders' weights as given: in float32, as `lcm cache` loads them and a run compares them.

    `captions_only`: the cache holds the caption strings and no text embeddings (nor ∅'s), and records the VAE's digest
    alone; `prompts` is not run (None will do). A `<out_dir>.partial` of the other kind is started again, not resumed."""
    out_dir = Path(out_dir)
    say = say or _say
    if (out_dir / PARTIAL_MARK).is_file() and (out_dir / MANIFEST).is_file():  # killed between its rename and `_tidy`
        _tidy(out_dir)
        say(f"{out_dir} was whole, renamed when the writer was stopped: its progress record is removed")
        return out_dir
    whole = (out_dir / MANIFEST).is_file()
    recorded = recorded_job(out_dir) if whole else None
    if not whole and out_dir.exists() and not is_empty_folder(out_dir):  # an empty folder (a user's mkdir) is the cache's
        raise UserError(taken_folder(out_dir))
    if not isinstance(dataset, ShardStream) and len(dataset) == 0:
        raise UserError("cannot cache an empty dataset")
    job = _job(dataset, codec, source, batch_size, shard_size, captions_only)
    if recorded is not None:  # a rerun after the cache finished: nothing to write where it is this job's
        say(f"{out_dir} is already a whole latent cache of this job ({_same_job(out_dir, recorded, job, prompts)} samples): "
            "nothing is written")
        return out_dir
    partial = partial_folder(out_dir, "runs/latents", "out_dir")  # `lcm cache` checked its --out before
    record = _resumable(partial, dataset, job, say)
    written = _Written.resumed(partial, job, dataset, record, say) if record else _Written.started(partial, job, dataset)
    pending: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []  # (latents, caption_index, source keys) not yet in a shard
    batches = UsableBatches(dataset, batch_size, num_workers, start=written.items)

    total = None if isinstance(dataset, ShardStream) else len(dataset)
    done = sum(s["num_samples"] for s in written.shards)
    with progress_bar(total=total, initial=done, desc="latent cache", unit="sample", disable=not progress) as bar, \
            _nothing_left_on_refusal(written):  # the bar closed before a stop's one line
        for images, captions, keys in batches:
            encoded = codec.encode(images)
            latents = encoded.float().cpu()
            _check_encoded(out_dir, {"latents": latents}, encoded.dtype)
            pending.append((latents, written.index(captions), keys))
            written.image_size, written.latent_shape = list(images.shape[-2:]), list(latents.shape[1:])
            if sum(len(p[1]) for p in pending) >= shard_size:
                written.add_shard(pending, batches)
            bar.update(len(captions))  # samples written: short of the total by those skipped
        if pending:
            written.add_shard(pending, batches)
        if not written.shards:  # in the bar's block: a log's end line would come before the one line of this stop
            raise UserError(_no_usable_sample(dataset))

    captions = list(written.caption_ids)
    if captions_only:
        with naming_failures(partial / CAPTIONS):  # a full disk names the file: its write() errors name none
            _write_captions(partial / CAPTIONS, captions, None)
        text = {CAPTIONS_ONLY: True}
    else:
        text = _write_text_embeddings(partial, out_dir, prompts, captions, device, tuple(written.image_size), batch_size, progress, say)
    manifest = {
        "format": FORMAT,
        "num_samples": sum(s["num_samples"] for s in written.shards),
        "shards": written.shards,
        "latent_channels": written.latent_shape[0],
        "latent_size": written.latent_shape[1:],
        "scaling_factor": codec.scaling_factor,
        "num_captions": len(captions),
        **{key: value for key, value in text.items() if key != ENCODERS},
        SOURCE_KEYS: True,
        "source": source,
        ENCODERS: {"vae": job["encoder"]} | text.get(ENCODERS, {}),
        JOB: job,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    move_into_place(partial, out_dir)  # marked until renamed: a kill before this leaves a `.partial` that a rerun resumes or replaces
    _tidy(out_dir)
    return out_dir


@contextmanager
def _nothing_left_on_refusal(written: _Written) -> Iterator[None]:
    """Remove `<cache>.partial` where the data is refused (a UserError: no usable sample, latents that come out NaN) before a
    shard was written: it holds nothing to resume, and a refused input writes nothing (docs/guide.md). A partial with
    whole shards is kept for the rerun to go on from."""
    try:
        yield
    except UserError:
        if not written.shards:
            shutil.rmtree(written.partial, ignore_errors=True)
        raise


def _no_usable_sample(dataset) -> str:
    """The one line of a cache of data without a usable sample: what the data skipped, and for webdataset shards whose
    samples lacked a caption the members a sample needs."""
    skipped = getattr(dataset, "skipped", None)
    uncaptioned = skipped is not None and skipped.counts["no_caption"] > 0  # not for images that did not decode
    what = (f"webdataset shards need key.jpg (or .png, .webp, ...) with a caption in {CAPTION_MEMBERS}"
            if isinstance(dataset, ShardStream) and uncaptioned else "check the files")
    return f"no usable sample in the data ({skipped.summary() if skipped else 'none given'}); {what}"


def _write_text_embeddings(partial: Path, out_dir: Path, prompts, captions: list[str], device, size: tuple[int, int],
                           batch_size: int, progress: bool, say: Callable[[str], None]) -> dict:
    """CAPTIONS of a full cache in `partial`: `captions` and their text embeddings, encoded by `prompts` at the images' `size`
    (an SDXL condition's micro-conditioning), and ∅'s; `say` notes the captions the text encoder cut (`LongCaptions`).
    What the manifest records of them: the embeddings' width and length, and the digests (ENCODERS) of the text encoders
    that made them."""
    long = LongCaptions(prompts)
    embeddings = _encoded_captions(out_dir, prompts, captions, device, size, batch_size, progress, long)
    first = next(embeddings)
    uncond = prompts.uncond(device, size)[0]
    _check_encoded(out_dir, {"empty prompt's embedding": uncond}, uncond.dtype)
    with naming_failures(partial / CAPTIONS):  # a full disk names the file: its write() errors name none
        _write_captions(partial / CAPTIONS, captions, ([len(captions), *first.shape[1:]], itertools.chain([first], embeddings),
                                                       uncond.float().cpu()))
    if (note := long.note("distinct captions")) is not None:
        say(note)
    return {"text_hidden_size": int(first.shape[-1]), "max_length": int(first.shape[1]),
            ENCODERS: {name: _weights_digest(encoder) for name, encoder in _prompt_encoders(prompts).items()}}


def _tidy(cache: Path) -> None:
    """Remove from a whole cache, just renamed, the record of its writing (PROGRESS, the shards' first-seen captions), then
    its mark: a kill before the mark goes leaves a whole cache that a rerun of `write_latent_cache` tidies."""
    for path in cache.glob("shard-*.captions.json"):
        path.unlink()
    (cache / PROGRESS).unlink(missing_ok=True)
    (cache / PARTIAL_MARK).unlink()


def _say(line: str) -> None:
    """A note of `write_latent_cache` on stderr, where a caller gives no `say`."""
    print(f"latent cache: {line}", file=sys.stderr, flush=True)


@dataclass
class _Written:
    """What `<cache>.partial`, written by `job` (`_job`), holds: its whole shards (`shards`, each recorded in PROGRESS once
    on disk), the distinct captions in the order they were first seen (caption u is row u of the text embeddings), where
    the reading of the data got to with those shards (`items`, `UsableBatches.items`: a map-style dataset's items read, or
    shards' [shard, after], `shards.OncePosition`), and the size of the images and their latents."""

    partial: Path
    job: dict
    shards: list[dict] = field(default_factory=list)
    caption_ids: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)  # the captions first seen since the last shard
    items: int | list[int] = 0
    image_size: list[int] = field(default_factory=list)
    latent_shape: list[int] = field(default_factory=list)
    scanned: SkipCounter | None = None  # the data's skip counts before its reading (an image folder's scan), if it counts

    @classmethod
    def started(cls, partial: Path, job: dict, dataset) -> _Written:
        """A new, empty `partial` (`start_partial`)."""
        return cls(start_partial(partial, PARTIAL_MARK, "a latent cache"), job, scanned=_skip_copy(dataset))

    @classmethod
    def resumed(cls, partial: Path, job: dict, dataset, record: dict, say: Callable[[str], None]) -> _Written:
        """`partial` as its PROGRESS `record` left it, everything it does not name removed (a shard or the captions file
        half-written when the writer was killed); the skips the record counted in the reading added to `dataset`'s own
        (its scan's, made again: images added or removed without a caption count as they are now), so that the data's
        summary at the end is the uninterrupted run's. The caption table is the one `_resumable` rebuilt from each shard's
        first-seen captions (`_first_seen`)."""
        shards = [{"file": s["file"], "num_samples": s["num_samples"]} for s in record["shards"]]
        keep = {PARTIAL_MARK, PROGRESS} | {s["file"] for s in shards} | {_captions_file(s["file"]) for s in shards}
        for path in partial.iterdir():
            if path.name in keep:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        caption_ids = {caption: u for u, caption in enumerate(record["captions"])}
        scanned, counter = _skip_copy(dataset), getattr(dataset, "skipped", None)
        if counter is not None:
            counter.counts = counter.counts + Counter(record["skipped"]["counts"])
            counter.seen = counter.seen | {(reason, detail) for reason, detail in record["skipped"]["seen"]}
        say(f"resuming {partial} at {_reading_at(dataset, record['items'])} ({len(shards)} shards written)")
        return cls(partial, job, shards, caption_ids, [], record["items"], record["image_size"], record["latent_shape"], scanned)

    def index(self, captions: list[str]) -> torch.Tensor:
        """The caption index of `captions`, each new one added to the table."""
        ids = []
        for caption in captions:
            u = self.caption_ids.get(caption)
            if u is None:
                u = self.caption_ids[caption] = len(self.caption_ids)
                self.fresh.append(caption)
            ids.append(u)
        return torch.tensor(ids, dtype=torch.int64)

    def add_shard(self, pending: list[tuple[torch.Tensor, torch.Tensor, list[str]]], batches: UsableBatches) -> None:
        """Write `pending` as the next shard, then record it in PROGRESS with where `batches` got to: the shard file and its
        first-seen captions are on disk before the record names them, and the record is replaced whole, so that a kill
        at any moment leaves a record of whole shards only. Each shard's first-seen captions are a file of their own:
        the whole table rewritten with each shard would be 45 MB a shard at LAION's 650K distinct captions."""
        name = f"shard-{len(self.shards):05d}.safetensors"
        latents, index = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
        keys = _key_tensors([key for p in pending for key in p[2]])
        with naming_failures(self.partial / name):  # a full disk names the shard, where safetensors' error names no file
            save_file({"latents": latents.contiguous(), "caption_index": index} | keys, str(self.partial / name))
        permit_as_umask(self.partial / name)
        with open(self.partial / name, "rb") as f:  # on disk before the record names it: a power cut keeps no record of a hole
            os.fsync(f.fileno())
        write_json_atomic(self.partial / _captions_file(name), self.fresh, indent=None)
        self.shards.append({"file": name, "num_samples": len(index)})
        self.fresh, self.items = [], batches.items
        pending.clear()
        skipped = batches.skipped()
        write_json_atomic(self.partial / PROGRESS, {
            "job": self.job, "shards": self.shards, "items": self.items, "image_size": self.image_size, "latent_shape": self.latent_shape,
            "skipped": None if skipped is None else {"counts": dict(skipped.counts - self.scanned.counts),
                                                     "seen": sorted(map(list, skipped.seen - self.scanned.seen))},
        })


def _reading_at(dataset, items: int | list[int]) -> str:
    """Where a resumed reading of `dataset` goes on, in a note: at an item of a map-style dataset, or in a .tar shard
    (`OncePosition` [shard, after]), numbered from 1 as a user counts them."""
    if not isinstance(dataset, ShardStream):
        return f"sample {items} of {len(dataset)}"
    shard, count = items[0], len(dataset.shards)
    return "the end of the webdataset shards" if shard == count else f"webdataset shard {shard + 1} of {count} ({dataset.shards[shard]})"


def _skip_copy(dataset) -> SkipCounter | None:
    """A copy of `dataset`'s skip counts as they are now; None for data that counts none. PROGRESS records the reading's
    skips, those counted since the scan: a resume scans the folder again, and counts what the scan finds now."""
    counter = getattr(dataset, "skipped", None)
    return None if counter is None else counter.with_counted(())


def _captions_file(shard: str) -> str:
    """The file beside a shard in `<cache>.partial` that holds the captions first seen in it, in order."""
    return shard.removesuffix(".safetensors") + ".captions.json"


# What a job's part (`_job`) differs in when another job wrote a `<cache>.partial`, in the note that starts it again
_JOB_PARTS = {"format": "version of lcm (cache format)",
              CAPTIONS_ONLY: "choice of --captions-only (caption strings, or their text embeddings)",
              SOURCE_KEYS: "version of lcm (shards without their samples' source keys)",
              "source": "source (--data, --model or resolution)", "data": "data (other image files or captions)", "encoder": "VAE (other weights)",
              "device": "device type (--device)", "batch_size": "batch size", "shard_size": "shard size"}
_SHARDS_DATA = "data (other .tar shards: names, sizes or first bytes)"  # `_JOB_PARTS["data"]` of webdataset shards
_NAMED_DATA = "data (the registered dataset drawn otherwise, by another version of lcm)"  # ... of a registered dataset
# What a record written before a part was added to the job means by its absence: every earlier version wrote full caches
_EARLIER_JOB = {CAPTIONS_ONLY: False, SOURCE_KEYS: False}


def _job(dataset, codec: LatentCodec, source: dict, batch_size: int, shard_size: int, captions_only: bool) -> dict:
    """What a `<cache>.partial` must have been written by for a rerun to go on with it: the same kind of cache
    (`captions_only` or not: a rerun that changed it is started again, not finished as the other kind; shards with their
    samples' source keys, SOURCE_KEYS, which an earlier version's lack), `source` (the
    files it names, `_as_real_paths`), data, VAE, type of device the VAE runs on (a GPU rounds otherwise than a CPU:
    shards of both would make a cache that is neither's), and batch and shard size (they place the shard boundaries).
    The data is an image folder's count of samples, resolution and digest of their file names and captions, which its
    scan holds: a stat of each file (let alone the 32 KiB of each that a training run's fingerprint reads) is minutes at
    12 million files on a network disk, at every start of every cache. Of webdataset shards, their count, resolution and
    fingerprint (`ShardStream.fingerprint`: each one's name, size and first 16 KiB, as a training checkpoint records
    them): a position in them is a shard's index and a byte offset, which in another file are other samples. Of a
    registered dataset, `_named_data`'s. None for other data, whose reading does not resume. The size the images are read
    at (`lcm cache --resolution`) is in `source` and in the data's (a registered dataset's, in its first image): a rerun
    at another size, whose latents are of other images, starts again."""
    data, named = None, _registered_spec(source.get("data"))
    if named is not None:
        data = _named_data(dataset, named)
    elif isinstance(dataset, ImageFolderDataset):
        names = hashlib.sha256()
        hash_json_list(names, ([file_name, caption] for file_name, caption in dataset.samples))
        data = {"samples": len(dataset), "resolution": dataset.resolution, "fingerprint": names.hexdigest()[:16]}
    elif isinstance(dataset, ShardStream):
        data = {"shards": len(dataset.shards), "resolution": dataset.resolution, "fingerprint": dataset.fingerprint()}
    job = {"format": FORMAT, CAPTIONS_ONLY: captions_only, SOURCE_KEYS: True, "source": _as_real_paths(source), "data": data,
           "encoder": _encoder_digest(codec), "device": codec.vae.device.type, "batch_size": batch_size, "shard_size": shard_size}
    return json.loads(json.dumps(job))  # as PROGRESS holds it: a tuple in `source` compares as the list it is read back as


def _registered_spec(spec) -> str | None:
    """The registered dataset (`data.spec.register_scheme`: world:shapes) that the data spec `spec` names, spelled as every
    spelling of it is (`canonical_spec`: world:shapes and world:shapes:train alike); None where it names none."""
    if not isinstance(spec, str):
        return None
    scheme, _, name = spec.partition(":")
    return canonical_spec(spec) if name and scheme in SCHEMES else None


def _named_data(dataset, spec: str) -> dict:
    """What a `<cache>.partial` of the registered dataset `spec` must have read for a rerun to go on with it: a registered
    dataset is made by code, item i the same at every opening (the world's shapes drawn from a generator seeded by the
    split and i, its digits fixed scans split with a fixed seed), so a resume reads it from an item as it reads an image
    folder; its name and number of samples, and a digest of its first sample's image and caption, which a version of lcm
    that draws the dataset otherwise changes (a cache of both would be neither's)."""
    first = dataset[0]
    digest = hashlib.sha256(first["caption"].encode())
    digest.update(first["image"].contiguous().numpy().tobytes())
    return {"named": spec, "samples": len(dataset), "fingerprint": digest.hexdigest()[:16]}


# The parts of a job's `source` that name a file or folder (`lcm cache --data`, `--model`)
PATH_PARTS = ("data", "model")


def _as_real_paths(source: dict) -> dict:
    """`source` with its --data and --model (PATH_PARTS) as the real path of the file or folder each names, and a
    registered dataset by its one spelling: the rerun of a job spelled another way (`images/` as a shell completes it, then
    `images`; a relative path from another folder; world:shapes:train for world:shapes) is the same job, and hours of
    encoding are not started again for a spelling. Its other parts are no paths (a world build's {"dataset": "shapes",
    "split": "train"}): as a real path, the job of a rerun from a folder holding a file called "train" was another. The
    manifest keeps `source` as given."""
    return {key: _real_path(value) if key in PATH_PARTS and isinstance(value, str) else value for key, value in source.items()}


def _real_path(value: str) -> str:
    """The registered dataset `value` names, spelled canonically (`_registered_spec`: a data spec names it before any
    file), else the real path of the file or folder it names (`~` expanded, links resolved), or `value` where it names
    none (a hub id)."""
    named = _registered_spec(value)
    if named is not None:
        return named
    path = os.path.expanduser(value)
    return os.path.realpath(path) if os.path.exists(path) else value


def recorded_data(spec: str) -> str:
    """The data spec `spec` (`lcm cache --data`) as a manifest's source records it: a registered dataset by its one spelling
    (`_registered_spec`), a file or folder by its absolute resolved path, a shard pattern (data/{00000..00009}.tar) with its
    folder made absolute. An earlier version recorded it as typed, relative to the folder `lcm cache` ran in: a record
    that only names the data where it was made (`source_data`)."""
    named = _registered_spec(spec)
    if named is not None:
        return named
    path = os.path.expanduser(spec)
    return os.path.realpath(path) if os.path.exists(path) else os.path.abspath(path)


def source_data(spec: str) -> str | None:
    """The data the latent cache `spec` was written from, as its manifest's source records it (`recorded_data`; an earlier
    version's relative record as it is); None where `spec` is no cache or its manifest records no data (a world's cache
    records its dataset and split instead). Read for the held-out checks (`training.config`): a cache reads its own files
    only, and is the images it was written from."""
    try:
        manifest = json.loads((Path(spec).expanduser() / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    source = manifest.get("source") if isinstance(manifest, dict) else None
    data = source.get("data") if isinstance(source, dict) else None
    return data if isinstance(data, str) and data.strip() else None


def _encoder_digest(codec: LatentCodec) -> str:
    """A digest of the VAE's weights, its scaling factor and, where its config gives them, the latent statistics μ and σ
    it standardises with (`_weights_digest`; `models.LatentCodec`): the latents of a shard depend on nothing else of the
    model (the captions are encoded at the end). Without statistics the salt is the scaling factor alone, as before they
    were applied, so that the caches of other VAEs stay valid; a cache written from a VAE with statistics before then
    holds latents that were not standardised, and is refused."""
    statistics = "" if codec.latents_mean is None else f" {codec.latents_mean.tolist()} {codec.latents_std.tolist()}"
    return _weights_digest(codec.vae, str(codec.scaling_factor) + statistics)


def _weights_digest(module: torch.nn.Module, salt: str = "") -> str:
    """A digest of `salt` and `module`'s floating-point weights: their names, dtypes, shapes and bytes. Integer buffers
    (CLIP's position ids, saved or not as transformers' version has it) are no weights. About 0.4 s for SD's 84M-parameter
    VAE and 0.6 s for its 123M-parameter text encoder on one CPU core (sha256 at about 1.5 GB/s)."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
            digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()[:16]


def _prompt_encoders(prompts) -> dict[str, torch.nn.Module]:
    """The text encoder(s) of a prompt encoder (`models.DiffusionModel.prompts`) by their folder names: an SDXL one's two
    (`pairs`), else its one (CLIP or T5)."""
    encoders = [encoder for _, encoder in prompts.pairs] if hasattr(prompts, "pairs") else [prompts.text_encoder]
    return dict(zip(TEXT_ENCODERS, encoders))


_RUN_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a run's frozen part -> `_float32_digest`


def _float32_digest(model: DiffusionModel, name: str, module: torch.nn.Module) -> str:
    """The digest (`_weights_digest`; the VAE's `_encoder_digest`) of `model`'s part `name` (`module`) in float32, as
    `lcm cache` loads it, computed once for the run's process (its training, held-out and ODE-bank batches each check
    their cache). Where mixed precision froze the part in half precision (`training.objectives.freeze_in_half_precision`,
    before the data is opened) its float32 weights are read again from the model's folder, as `models.
    restore_frozen_parts_in_float32` reads them: a half-precision weight does not give back the float32 one it was rounded
    from, and a digest of the rounded bytes would be another for each dtype a run may choose. For SD 1.5 that is about 1 s
    at a run's start in float32, 1.1 s in half precision (its VAE and text encoder read again from the page cache)."""
    if module not in _RUN_DIGESTS:
        weights = module
        if {t.dtype for t in module.state_dict().values() if t.is_floating_point()} != {torch.float32}:
            folder = check_hub_id(model.source, "a diffusers model from")
            weights = load_component(type(module), folder, name, torch_dtype=torch.float32, use_safetensors=True)
        _RUN_DIGESTS[module] = _encoder_digest(LatentCodec(weights)) if name == "vae" else _weights_digest(weights)
    return _RUN_DIGESTS[module]


def _encoder_parts(model: DiffusionModel, captions_only: bool = False) -> dict[str, torch.nn.Module]:
    """The parts of `model` that make a cache's contents, by the names ENCODERS records them under: the VAE and the text
    encoder(s), or the VAE alone for a `captions_only` cache (its captions are encoded by the run's own model)."""
    return {"vae": model.vae, **({} if captions_only else dict(zip(TEXT_ENCODERS, model.text_encoders)))}


def digest_encoders_before_cast(model: DiffusionModel, specs: Iterable[str]) -> None:
    """For a run whose data includes a latent cache: each part's `_float32_digest` while its weights are still float32,
    called before mixed precision casts them (`training.objectives.freeze_in_half_precision`), so that the cache's check
    does not read them again from the model's folder (PixArt's T5-XXL: 19 GB in float32). Of a captions-only cache, the
    VAE's alone: the text encoders are not checked, and T5-XXL's digest is 13 s."""
    for spec in specs:
        cache = Path(spec).expanduser()
        if spec and (cache / MANIFEST).is_file():
            for name, module in _encoder_parts(model, _captions_only(cache)).items():
                _float32_digest(model, name, module)


def _captions_only(cache: Path) -> bool:
    """Whether the manifest of the cache at `cache` says it is captions-only; False where it is not readable, refused with
    its one line where the cache is opened (`_read_manifest`)."""
    try:
        return _read_manifest(cache).get(CAPTIONS_ONLY) is True
    except UserError:
        return False


def _resumable(partial: Path, dataset, job: dict, say: Callable[[str], None]) -> dict | None:
    """The PROGRESS record of `partial` where a rerun can go on from it, with the caption table so far ("captions"): written
    by this `job`, its shards and their readable first-seen captions there, `dataset` an image folder or webdataset
    shards. Otherwise None, and, where `partial` holds anything to lose, a note saying why it is started again. `partial`
    must be an unfinished cache or nothing (`check_partial`)."""
    check_partial(partial, PARTIAL_MARK, "a latent cache")
    if not partial.is_dir() or not any(p.name != PARTIAL_MARK for p in partial.iterdir()):
        return None
    if job["data"] is None:  # other data has no identity to check
        record, why = None, "only the reading of an image folder, of webdataset shards or of a registered dataset resumes"
    else:
        record, why = _read_progress(partial, isinstance(dataset, ShardStream))
    if record is not None:
        differs = _other_part(record["job"], job)
        if differs in record["job"] or differs in _EARLIER_JOB:
            what = _data_part(job) if differs == "data" else _JOB_PARTS[differs]
            record, why = None, f"it was written with another {what}"
        elif differs is not None:  # a part added since (the device type): an earlier version wrote the record
            record, why = None, f"its {PROGRESS}, written by an earlier version of lcm, records no {differs}"
    if record is not None:
        missing = [f for s in record["shards"] for f in (s["file"], _captions_file(s["file"])) if not (partial / f).is_file()]
        if missing:
            record, why = None, f"its file {missing[0]} is missing"
    if record is not None:
        captions, why = _first_seen(partial, record["shards"])
        record = None if captions is None else record | {"captions": captions}  # the table `_Written.resumed` goes on with
    if record is None:
        say(f"note: {partial} is started again: {why}")
    return record


def _other_part(recorded: dict, job: dict) -> str | None:
    """The first part of `job` (`_JOB_PARTS`) in which the job `recorded` (a PROGRESS record's, a manifest's JOB) differs,
    a part absent from a record written before it was added meaning what `_EARLIER_JOB` says; None where it is the same
    job."""
    recorded = _EARLIER_JOB | recorded
    return next((part for part in _JOB_PARTS if recorded.get(part) != job[part]), None)


def _data_part(job: dict) -> str:
    """The job's data, as the note that starts a `<cache>.partial` of other data again names it: of webdataset shards, of a
    registered dataset or of an image folder."""
    if "shards" in job["data"]:
        return _SHARDS_DATA
    return _NAMED_DATA if "named" in job["data"] else _JOB_PARTS["data"]


def _first_seen(partial: Path, shards: list[dict]) -> tuple[list[str] | None, str]:
    """The captions of `partial`'s `shards` in the order they were first seen (the caption table so far), read from each
    shard's file of them; or None and why, where one is not a list of captions new to the table (damaged by hand or by
    the disk): a table read wrong would pair each later sample with another's caption."""
    captions: list[str] = []
    for shard in shards:
        name = _captions_file(shard["file"])
        try:
            fresh = json.loads((partial / name).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            fresh = None
        if not isinstance(fresh, list) or not all(isinstance(caption, str) for caption in fresh):
            return None, f"its file {name} is unreadable"
        captions += fresh
    if len(set(captions)) < len(captions):
        return None, "its files of first-seen captions name a caption twice"
    return captions, ""


def _read_progress(partial: Path, shards: bool) -> tuple[dict | None, str]:
    """`partial`'s PROGRESS record, or None and why there is none to go on from. Its reading position ("items") is
    [shard, after] of webdataset `shards` (`OncePosition`), else an item's index."""
    try:
        record = json.loads((partial / PROGRESS).read_text())
    except FileNotFoundError:
        return None, f"it holds no record of a whole shard ({PROGRESS}; an earlier version of lcm wrote none)"
    except (OSError, UnicodeDecodeError, ValueError):
        return None, f"its {PROGRESS} is unreadable"
    fields = ("job", "shards", "items", "image_size", "latent_shape", "skipped")
    if not (isinstance(record, dict) and all(f in record for f in fields) and isinstance(record["job"], dict)
            and isinstance(record["shards"], list) and _is_position(record["items"], shards)
            and all(isinstance(s, dict) and s.get("file") == f"shard-{k:05d}.safetensors" and isinstance(s.get("num_samples"), int)
                    for k, s in enumerate(record["shards"]))):
        return None, f"its {PROGRESS} is not one this version writes"
    return record, ""


def _is_position(items, shards: bool) -> bool:
    """Whether `items` is a reading position as PROGRESS records it: [shard, after] for webdataset `shards`, else an int."""
    if shards:
        return isinstance(items, list) and len(items) == 2 and all(type(n) is int for n in items)
    return type(items) is int


def _encoded_captions(out_dir: Path, prompts, captions: list[str], device, size: tuple[int, int], batch_size: int,
                      progress: bool, long: LongCaptions) -> Iterator[torch.Tensor]:
    """The text embeddings of `captions`, `batch_size` at a time, in float32 on the CPU; a UserError at the first batch that
    comes out NaN or infinite (`_check_encoded`). With its own progress: LAION's 650K distinct captions are a phase of
    their own."""
    with progress_bar(total=len(captions), desc="latent cache captions", unit="caption", disable=not progress) as bar:
        for i in range(0, len(captions), batch_size):
            long.add(captions[i : i + batch_size])
            batch = prompts.encode(captions[i : i + batch_size], device, size)
            _check_encoded(out_dir, {"text embeddings": batch}, batch.dtype)
            yield batch.float().cpu()
            bar.update(len(batch))


@dataclass
class LongCaptions:
    """The captions of the data that a prompt encoder (`models.DiffusionModel.prompts`) cuts, counted as they are encoded
    (`prompts.truncated_prompts`: tokens past CLIP's 77 or T5's 120 are dropped, as diffusers drops them), for one note
    per run: diffusers' training scripts cut them without a word, and a recaptioned dataset (LLaVA's paragraphs) loses
    most of each caption so, as a prompt to `lcm generate` is cut with a note."""

    prompts: object
    count: int = 0  # captions cut
    seen: int = 0  # captions counted
    longest: int = 0  # tokens of the longest
    limit: int = 0  # the most tokens the text encoder reads

    def add(self, captions: list[str]) -> None:
        for _, tokens, limit in truncated_prompts(self.prompts, captions):
            self.count, self.longest, self.limit = self.count + 1, max(self.longest, tokens), limit
        self.seen += len(captions)

    def note(self, what: str) -> str | None:
        """The note of the captions cut so far (`what` they are: "distinct captions"), None where none was."""
        if not self.count:
            return None
        return (f"note: the text encoder reads at most {self.limit} tokens of a caption, and cuts {self.count} of the {self.seen} {what} "
                f"(the longest is {self.longest} tokens), as diffusers cuts them; shorten them to train on all of each")


def _write_captions(target: Path, captions: list[str], text: tuple[list[int], Iterator[torch.Tensor], torch.Tensor] | None) -> None:
    """CAPTIONS written batch by batch as its text embeddings arrive, byte for byte the file that `save_file` writes of
    {"text_embeddings" [U,L,D], "uncond_embedding", "caption_bytes", "caption_offsets"} (`CaptionTable`), without holding
    every caption's embedding at once (236 KB each in SD 1.5, 150 GB for LAION's 650K distinct captions) nor every
    caption's bytes. `text` is (the embeddings' shape [U,L,D], the embeddings in batches, ∅'s), or None for a
    captions-only cache, whose file holds caption_bytes and caption_offsets alone.

    save_file's layout (safetensors' spec): an 8-byte little-endian header length, the header as compact JSON (the
    tensors in the order of their data: by dtype, widest first, then name) padded with spaces to a multiple of 8 bytes,
    then each tensor's little-endian bytes."""
    lengths = np.fromiter((len(c.encode()) for c in captions), dtype=np.int64, count=len(captions))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    shapes = {"caption_offsets": [len(offsets)]}  # safetensors' order: I64, then F32 by name, then U8
    if text is not None:
        shape, embeddings, uncond = text
        shapes |= {"text_embeddings": shape, "uncond_embedding": list(uncond.shape)}
    shapes["caption_bytes"] = [int(offsets[-1])]
    header, end = {}, 0
    for name, dims in shapes.items():
        size = math.prod(dims) * DTYPES[LAYOUT[name][0]].itemsize
        header[name] = {"dtype": LAYOUT[name][0], "shape": dims, "data_offsets": [end, end + size]}
        end += size
    head = json.dumps(header, separators=(",", ":")).encode()  # serde_json's compact form, as save_file's
    head += b" " * (-len(head) % 8)
    with open(target, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + offsets.tobytes())
        if text is not None:
            for batch in embeddings:
                if list(batch.shape[1:]) != shape[1:]:
                    raise ValueError(f"the prompt encoder gave conditions of shape {list(batch.shape[1:])} after {shape[1:]}")
                f.write(batch.contiguous().numpy().tobytes())
            f.write(uncond.contiguous().numpy().tobytes())
        for i in range(0, len(captions), CAPTIONS_PER_WRITE):
            f.write(b"".join(c.encode() for c in captions[i : i + CAPTIONS_PER_WRITE]))


class CaptionTable(Sequence):
    """The distinct caption strings of a cache, each decoded from UTF-8 bytes when it is asked for: caption u is
    `data[offsets[u]:offsets[u + 1]]`, views of the captions file's mapped body (format FORMAT). Nothing is read at open,
    so a cache of 12M captions opens at once in every training process and holds no string it does not use."""

    def __init__(self, target: Path, data: np.ndarray, offsets: np.ndarray):
        self.target, self._data, self._offsets = target, memoryview(data), offsets  # a memoryview slices without a copy
        if not len(offsets) or offsets[0] != 0 or offsets[-1] != len(data):
            _unreadable(target, "its caption_offsets do not span its caption_bytes")

    @classmethod
    def of(cls, target: Path, captions: list[str]) -> CaptionTable:
        """The table of `captions` in memory: those of a cache of format HEADER_CAPTIONS, read as one written now is."""
        encoded = [c.encode() for c in captions]
        return cls(target, np.frombuffer(b"".join(encoded), dtype=np.uint8), np.cumsum([0, *map(len, encoded)], dtype=np.int64))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return self.take(range(len(self))[u])
        return self.take([range(len(self))[u]])[0]  # an IndexError past the end, as a list's

    def take(self, ids) -> list[str]:
        """The captions `ids` (caption indices: a sequence, an array or a tensor), in one pass: a fingerprint decodes every
        sample's, at twice the speed of one `self[u]` after another."""
        ids = np.asarray(ids, dtype=np.int64)
        begins, ends = self._offsets[ids], self._offsets[ids + 1]
        if len(ids) and not (begins.min() >= 0 and (begins <= ends).all() and ends.max() <= len(self._data)):
            _unreadable(self.target, "its caption_offsets place captions outside its caption_bytes")
        try:
            return [str(self._data[b:e], "utf-8") for b, e in zip(begins.tolist(), ends.tolist())]
        except UnicodeDecodeError:
            _unreadable(self.target, "its caption_bytes are not UTF-8 text where its caption_offsets place them")


@dataclass
class CachedLatents:
    """A whole cache as tensors: sample i is (latents[i], text_embeddings[caption_index[i]]); a captions-only cache has no
    text embeddings (None), its sample i's caption being `LatentCache.captions_of`."""

    latents: torch.Tensor
    caption_index: torch.Tensor
    text_embeddings: torch.Tensor | None
    uncond_embedding: torch.Tensor | None


class LatentCache(torch.utils.data.Dataset):
    """A latent cache read back; items {"latents" [C,h,w], "text_embedding" [L,D], "caption"} (no "text_embedding" in a
    `captions_only` cache, whose `text_embeddings` and `uncond_embedding` are None: a run encodes its captions).

    Its files are mapped, not read (`_read_tensors`): `shards` are zero-copy views of each shard's latents, `text_embeddings`
    of the captions file's, `captions` of its distinct caption strings, decoded as they are asked for (`CaptionTable`);
    only the caption index (8 bytes a sample) is copied. `rows` are the samples' rows in the shards, end to end (those of
    one side of a held-out split). `small`: at most SMALL_CACHE_BYTES, scanned whole for NaN when read and moved whole to
    a training device; a larger cache is checked micro-batch by micro-batch (`gather`)."""

    def __init__(self, path: str | Path, holdout: Holdout | None = None):
        self.path = path = Path(given_name(path, "the latent cache", "the folder `lcm cache` wrote"))  # "" is no current folder
        self.manifest = _read_manifest(path)
        keys = KEY_TENSORS if self.manifest.get(SOURCE_KEYS) is True else ()  # mapped, and checked against the file, as the rest
        shards = [_read_tensors(path, s["file"], ("latents", "caption_index", *keys))[0] for s in self.manifest["shards"]]
        self.shards = [s["latents"] for s in shards]
        self._keys = [{key: s[key] for key in keys} for s in shards] if keys else None
        if len({s.shape[1:] for s in self.shards}) != 1:
            raise UserError(f"latent cache {path} is damaged (its shards or captions do not fit together); rebuild it")
        self.captions_only = self.manifest.get(CAPTIONS_ONLY) is True
        table, self.captions = _read_captions(path, self.manifest["format"], self.captions_only)
        index = torch.cat([s["caption_index"] for s in shards])
        self.text_embeddings, self.uncond_embedding = table.get("text_embeddings"), table.get("uncond_embedding")
        self._starts = torch.tensor([0] + [len(s) for s in self.shards]).cumsum(0)[:-1]  # each shard's first row
        rows = sum(len(s) for s in self.shards)
        text = {} if self.captions_only else {"text_embeddings": self.text_embeddings}
        uncond = {} if self.captions_only else {"uncond_embedding": self.uncond_embedding}
        if (rows != self.manifest["num_samples"] or any(len(t) != len(self.captions) for t in text.values()) or len(index) != rows
                or (len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self.captions))):
            raise UserError(f"latent cache {path} is inconsistent with its manifest; rebuild it")
        self.small = sum(t.nbytes for t in [*self.shards, *text.values()]) <= SMALL_CACHE_BYTES
        scanned = [{"latents": s} for s in self.shards] + [text] if self.small else []
        for tensors in scanned + [uncond]:  # a large cache's are checked as drawn (`gather`)
            self._check_finite(tensors)
        self.rows = torch.arange(rows)
        self.holdout_note: str | None = None  # for a held-out split of a cache without source keys, a note saying so
        if holdout is not None:
            self.rows = torch.tensor(holdout.select(self._source_keys(rows), "samples"))
        self.caption_index = index[self.rows]

    def _source_keys(self, rows: int) -> Sequence[str]:
        """What a held-out split hashes for each of the cache's `rows` samples: its source key (`_SourceKeys`: the image
        file, .tar shard or item index it was encoded from), so that the split holds out whole images, as the data's own
        split does. A cache written before the keys has its samples' indices as text (`_SampleNames`), with a note
        (`holdout_note`): an image with several captions (a line each) may then be on both sides."""
        if self._keys is not None:
            return _SourceKeys(self.path, self._keys, rows)
        self.holdout_note = (f"latent cache {self.path} records no source file of its samples (an earlier version of lcm wrote it): its "
                             "held-out split is by sample, so an image with several captions can be on both sides, and other images "
                             "than its data's own split; write it again with lcm cache to hold out whole images")
        return _SampleNames(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def latent_shape(self) -> torch.Size:
        """[C, h, w] of each sample's latents."""
        return self.shards[0].shape[1:]

    @property
    def latents(self) -> torch.Tensor:
        """Every sample's latents in one tensor: a copy of the whole cache, for a small one (`SMALL_CACHE_BYTES`)."""
        return self._latents(torch.arange(len(self)))

    def fingerprint(self) -> str:
        """A digest of the samples in order: the latents' shape, each sample's caption and its first 16 latent values, exactly
        (a cache rebuilt from the same images with the same models has the same one, from other images or models another).
        A training checkpoint records it, so that a run is not resumed on a rebuilt cache of other data of the same size.

        Fed to the digest FINGERPRINT_ROWS samples at a time, the same bytes as whole: every process of a run computes it,
        and at LAION-Aesthetics' 12M samples the whole caption index as Python ints and three copies of every head took
        1.5 GB in each."""
        shape = [len(self), *self.latent_shape]  # the JSON of [shape, every sample's caption], hashed caption by caption
        digest = hashlib.sha256(f"[{json.dumps(shape)}, ".encode())
        chunks = torch.arange(len(self)).split(FINGERPRINT_ROWS)
        hash_json_list(digest, (c for idx in chunks for c in self.captions_of(idx)))
        digest.update(b"]")
        for idx in chunks:  # one page of each sample read
            digest.update(self._latents(idx, head=16).numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_encoders(self, model: DiffusionModel) -> str | None:
        """A UserError when `model`'s VAE or a text encoder is not the one that made the cache (ENCODERS, `_float32_digest`):
        its latents or text embeddings are another model's, which a comparison of shapes and scaling factor let through.
        For a cache written before ENCODERS was recorded, a note that it cannot be checked; else None."""
        recorded = self.manifest.get(ENCODERS)
        if recorded is None:
            return (f"latent cache {self.path} records no digest of the VAE and text encoder that wrote it (an earlier version of lcm "
                    f"wrote it): it cannot be checked against {model.source}; write it again with lcm cache to have it checked")
        if not isinstance(recorded, dict):
            raise UserError(f"{self.path / MANIFEST} holds no digests of its encoders ({ENCODERS!r}); rebuild the latent cache")
        for name, module in _encoder_parts(model, self.captions_only).items():
            if recorded.get(name) != _float32_digest(model, name, module):
                what, made = PARTS[name]
                again = " --captions-only" if self.captions_only else ""
                raise UserError(f"latent cache {self.path} was written with another {what} than {model.source}'s (other weights), so its "
                                f"{made} are not this model's: write a cache with it, lcm cache --model {model.source} --data IMAGES "
                                f"--out CACHE{again}")
        return None

    def __getitem__(self, i: int) -> dict:
        c = int(self.caption_index[i])
        item = {"latents": self._latents(torch.tensor([i]))[0], "caption": self.captions[c]}
        return item if self.captions_only else item | {"text_embedding": self.text_embeddings[c]}

    def captions_of(self, idx: torch.Tensor) -> list[str]:
        """The captions of the samples `idx` (a CPU tensor), in order: what a run encodes of a captions-only cache."""
        return self.captions.take(self.caption_index[idx])

    def tensors(self, device: torch.device | str = "cpu") -> CachedLatents:
        """The whole cache on `device`, for training loops that index batches themselves: a small cache's
        (`SMALL_CACHE_BYTES`)."""
        text = (None, None) if self.captions_only else (self.text_embeddings.to(device), self.uncond_embedding.to(device))
        return CachedLatents(self.latents.to(device), self.caption_index.to(device), *text)

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text embeddings) of the samples `idx` of a full cache (`gather_latents`), the same values as `tensors`
        indexed by `idx`. A UserError when they hold NaN or infinity."""
        latents, cond = self.gather_latents(idx), self.text_embeddings[self.caption_index[idx]]
        self._check_finite({"text_embeddings": cond})
        return latents, cond

    def gather_latents(self, idx: torch.Tensor) -> torch.Tensor:
        """The latents of the samples `idx`, copied out of the mapped files on the CPU: a micro-batch of a cache too large to
        move whole to the device. A UserError when they hold NaN or infinity: a large cache is checked as it is drawn, not
        read whole at every start."""
        latents = self._latents(idx)
        self._check_finite({"latents": latents})
        return latents

    def _latents(self, idx: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """The latents of the samples `idx`, gathered from the shards that hold them; given `head`, only each one's first
        `head` values (flattened), which are all that is read of it."""
        rows = self.rows[idx]
        shard = torch.searchsorted(self._starts, rows, right=True) - 1
        shape = self.latent_shape if head is None else (min(head, math.prod(self.latent_shape)),)
        out = torch.empty((len(rows), *shape), dtype=self.shards[0].dtype)
        for s in shard.unique().tolist():
            at = shard == s
            values = self.shards[s] if head is None else self.shards[s].reshape(len(self.shards[s]), -1)[:, :head]
            out[at] = values[rows[at] - self._starts[s]]
        return out

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        """A UserError naming the first of `tensors` that holds NaN or infinity (`_non_finite`)."""
        bad = _non_finite(tensors)
        if bad:
            raise UserError(f"latent cache {self.path} is damaged: its {bad} hold NaN or infinite values (a float16 VAE or text "
                            "encoder overflows on some inputs); rebuild the cache with the model in float32")


class _SampleNames(Sequence):
    """The names a held-out split hashes for the `count` samples of a cache without source keys (an earlier version's),
    their indices as text (`Holdout.select`), each made as it is asked for: every process opens the cache, and at 12M
    samples a list of them took 800 MB in each."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> str:
        return str(range(self.count)[i])


class _SourceKeys(Sequence):
    """The source key of each of a cache's `count` samples (`Holdout.select`), decoded from its shard's key_bytes where
    its key_offsets place it (`shards`: each shard file's KEY_TENSORS, mapped) as it is asked for, as `_SampleNames` makes
    its names. A file name that is not UTF-8 (os.walk's surrogate escapes) is read back as the name it was written from."""

    def __init__(self, path: Path, shards: list[dict[str, torch.Tensor]], count: int):
        self.path, self.count = path, count
        self._data = [memoryview(s["key_bytes"].numpy()) for s in shards]
        self._offsets = [s["key_offsets"].numpy() for s in shards]
        self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        if self._starts[-1] != count or any(len(o) < 1 or o[0] != 0 or o[-1] != len(d) or (np.diff(o) < 0).any()
                                            for o, d in zip(self._offsets, self._data)):
            raise UserError(f"latent cache {path} is damaged (its source keys do not fit its samples); rebuild it")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> str:
        i = range(self.count)[i]
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        offsets, row = self._offsets[shard], i - int(self._starts[shard])
        return str(self._data[shard][int(offsets[row]) : int(offsets[row + 1])], "utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        """Each sample's key in order, shard by shard: what a split reads, without a search for each sample's shard."""
        for data, offsets in zip(self._data, self._offsets):
            bounds = offsets.tolist()
            for begin, end in zip(bounds, bounds[1:]):
                yield str(data[begin:end], "utf-8", "surrogateescape")


def _key_tensors(keys: list[str]) -> dict[str, torch.Tensor]:
    """A shard's KEY_TENSORS of its samples' source `keys`: their bytes end to end (a file name that is not UTF-8 as its
    bytes on the disk, as `Holdout.keeps` hashes it), and where each starts and ends."""
    encoded = [key.encode("utf-8", "surrogateescape") for key in keys]
    offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
    return {"key_bytes": torch.from_numpy(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()), "key_offsets": torch.from_numpy(offsets)}


class _Keyed(NamedTuple):
    """A sample's caption with its source key, as `UsableBatches` gives it to `read_batches`, which gathers each item's
    "caption" as it is: the key travels with its caption through the DataLoader and its worker processes."""

    caption: str
    key: str


class UsableBatches:
    """Batches (images, captions) of each usable sample of `dataset` once, in order, from `start` on (a map-style dataset's
    item, or shards' [shard, after], `shards.OncePosition`; 0: from the beginning): an image folder's corrupt image is left
    out (`ImageFolderDataset.read`), where its `__getitem__`, for a training run that draws without end, stands the next
    sample in for it and the cache would hold that sample twice; shards are read shard after shard
    (`ShardStream.samples_once`), where their stream resamples without end. `num_workers` DataLoader worker processes read
    a map-style dataset (shards are read and decoded in this process), with training's handling of their errors, skip
    counts and stops (`data.workers`); what they skipped is counted into `dataset.skipped` at the end.

    The DataLoader's batches are items [start + j·batch_size, start + (j+1)·batch_size), less those left out, so a
    reading from a `start` that is a multiple of `batch_size` forms the batches a reading from 0 forms there. Shards'
    batches are their usable samples `batch_size` at a time, in this process with no loader reading ahead, so the reading
    is held at each batch's last sample as the batch is given (`OncePosition`). Where the reading is (`items`, `skipped`)
    is what a resumed `write_latent_cache` goes on from. Each batch is (images, captions, source keys): the name the
    data's held-out split hashes for each sample (`_Read`, `_SamplesOnce`), which the cache keeps."""

    def __init__(self, dataset, batch_size: int, num_workers: int = 0, start: int | list[int] = 0):
        self.dataset, self.batch_size, self.start = dataset, batch_size, start
        self.num_workers = 0 if isinstance(dataset, ShardStream) else num_workers
        self.counted = _Counted()
        self.once = OncePosition(*start) if isinstance(start, list) else OncePosition()  # shards': moved by their reading

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str], list[str]]]:
        if isinstance(self.dataset, ShardStream):
            samples, sampler = _SamplesOnce(self.dataset, self.once), None
        else:
            samples, sampler = _Read(self.dataset), range(self.start, len(self.dataset))
        for images, keyed in read_batches(samples, self.batch_size, self.num_workers, self.counted, sampler):
            yield images, [k.caption for k in keyed], [k.key for k in keyed]
        counter = getattr(self.dataset, "skipped", None)
        if counter is not None and self.counted:
            merged = counter.with_counted(self.counted)
            counter.counts, counter.seen = merged.counts, merged.seen
            self.counted.named, self.counted.unnamed = set(), Counter()  # in `counter` now

    @property
    def items(self) -> int | list[int]:
        """Where the reading is: the dataset's items read so far, a map-style dataset's (those left out included), or
        shards' [shard, after] (`OncePosition`)."""
        if isinstance(self.dataset, ShardStream):
            return [self.once.shard, self.once.after]
        return min(self.start + self.counted.batches * self.batch_size, len(self.dataset))

    def skipped(self) -> SkipCounter | None:
        """The dataset's skip counts so far, what the workers counted included; None for data that counts none."""
        counter = getattr(self.dataset, "skipped", None)
        return None if counter is None else counter.with_counted(self.counted)


class _Counted(SkipEvents):
    """What DataLoader workers skipped (`read_batches`' `worker_skips`), and the number of the loader's batches read:
    `read_batches` adds each batch's events here once, a batch of nothing but left-out samples (which it does not
    yield) included, so `batches` says how far into the data the reading got."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def __iadd__(self, events: Iterable[tuple[str, str]]) -> _Counted:
        self.batches += 1
        super().__iadd__(events)
        return self


class _Read(torch.utils.data.Dataset):
    """A map-style dataset's samples, each with its source key (`_Keyed`): an image folder's each as itself, None for a
    corrupt one (`ImageFolderDataset.read`), keyed by its file name (what its held-out split hashes); any other's item i
    (a registered dataset's) keyed by i, as `spec.open_dataset` holds one out."""

    def __init__(self, dataset):
        self.dataset, self.skipped = dataset, getattr(dataset, "skipped", None)  # `skipped`: what `collate` sends back from a worker

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        folder = isinstance(self.dataset, ImageFolderDataset)
        item = self.dataset.read(index) if folder else self.dataset[index]
        if item is None:
            return None
        key = self.dataset.samples.files[index] if folder else str(index)
        return {"image": item["image"], "caption": _Keyed(item["caption"], key)}


class _SamplesOnce(torch.utils.data.IterableDataset):
    """Shards' usable samples, each once, from `position` on, which the reading moves along (`ShardStream.samples_once`),
    each keyed by the name of its .tar shard (`_Keyed`), which shards' held-out split hashes (`spec.open_dataset`)."""

    def __init__(self, stream: ShardStream, position: OncePosition):
        self.stream, self.position = stream, position

    def __iter__(self) -> Iterator[dict]:
        for item in self.stream.samples_once(self.position):  # the position is at the sample handed out: its shard's
            yield {"image": item["image"], "caption": _Keyed(item["caption"], Path(self.stream.shards[self.position.shard]).name)}


def _read_manifest(path: Path) -> dict:
    """The manifest of the cache at `path`: a JSON object of format FORMAT (or HEADER_CAPTIONS) that lists at least one
    shard file."""
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} is not a latent cache (no {MANIFEST}); write one with write_latent_cache")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path / MANIFEST} is not valid JSON ({err}); rebuild the latent cache") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path / MANIFEST} does not hold a JSON object; rebuild the latent cache")
    made = manifest.get("format")
    if not (isinstance(made, str) and made.startswith("latent-cache/")):  # another tool's manifest.json
        raise UserError(f'{path / MANIFEST} is not a latent cache\'s (it has no "format": "{FORMAT}"), and a folder with a '
                        "manifest.json is read as a latent cache: to train on the images in it, move manifest.json out of the folder")
    if made not in (FORMAT, HEADER_CAPTIONS):
        raise UserError(f"{path} holds a latent cache of format {made!r}, not {FORMAT!r}; rebuild it")
    shards = manifest.get("shards")
    if (not isinstance(shards, list) or not shards or not isinstance(manifest.get("num_samples"), int)
            or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards)):
        raise UserError(f"{path / MANIFEST} lists no shard files or no sample count; rebuild the latent cache")
    return manifest


def _read_captions(path: Path, made: str, captions_only: bool) -> tuple[dict[str, torch.Tensor], CaptionTable]:
    """The captions file's tensors `TABLE` (none of a `captions_only` cache), and its caption strings: its body's, or, in a
    cache of format HEADER_CAPTIONS, the list in its header's metadata (the strings of a cache of the same data written
    now)."""
    if made != HEADER_CAPTIONS:
        tensors, _ = _read_tensors(path, CAPTIONS, CAPTION_TENSORS if captions_only else TABLE + CAPTION_TENSORS)
        return tensors, CaptionTable(path / CAPTIONS, tensors["caption_bytes"].numpy(), tensors["caption_offsets"].numpy())
    tensors, metadata = _read_tensors(path, CAPTIONS, TABLE)
    try:
        captions = json.loads(metadata["captions"])
    except (KeyError, TypeError, ValueError):
        captions = None
    if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise UserError(f"latent cache {path} is damaged (its shards or captions do not fit together); rebuild it")
    return tensors, CaptionTable.of(path / CAPTIONS, captions)


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor that holds NaN or infinity (what a float16 VAE or text encoder gives where it
    overflows: not data to train on), or None."""
    for name, tensor in tensors.items():
        # its extremes (NaN makes both NaN, an infinity one of them): one read and no mask as large as the tensor, which for
        # a whole cache would take a quarter of its memory again
        if tensor.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            return name
    return None


def _check_encoded(out_dir: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A UserError as soon as encoding gives a non-finite value: a cache that would be refused when read is not written."""
    bad = _non_finite(tensors)
    if bad:
        raise UserError(f"encoding the data into {out_dir}: the {bad} came out NaN or infinite in {str(dtype).removeprefix('torch.')} "
                        "(a float16 VAE or text encoder overflows on some inputs); encode with the model in float32")


def _read_tensors(path: Path, file: str, keys: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors `keys` of the cache file `file` in `path`, of their `LAYOUT`, as zero-copy views of the file mapped into
    memory, and the file's metadata; a missing, unreadable or incomplete file is a UserError.

    The file is safetensors: an 8-byte little-endian header length N, N bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}, then the little-endian data, offsets counted from its start.
    The mapping (private: nothing is written back) reads pages on demand from the OS page cache, shared by every process
    that maps the file; the header is checked here, as the data is not read whole."""
    target = path / file
    if not target.is_file():
        raise UserError(f"latent cache {path} is missing its file {file}; rebuild the cache")
    header, start = _read_header(target)
    size = target.stat().st_size
    spans = {}
    for key in keys:
        if key not in header:
            raise UserError(f"latent cache file {target} has no {key}; rebuild the cache")
        spans[key] = _span(target, key, header[key], size - start)
    _check_apart(target, spans)
    mapped = torch.from_file(str(target), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for key, (dtype, shape, begin, end) in spans.items():
        data = mapped[start + begin : start + end]
        if (start + begin) % dtype.itemsize:  # safetensors aligns each tensor; a view needs it: another writer's file is copied
            data = data.clone()
        tensors[key] = data.view(dtype).reshape(shape)
    return tensors, header.get("__metadata__") or {}


def _read_header(target: Path) -> tuple[dict, int]:
    """The JSON header of the safetensors file `target` and where its data starts. A file this user may not read is a
    UserError too: a cache written by another user of a shared machine under a umask of 077, or by an earlier version of
    lcm (its shards as safetensors writes them, readable by their owner alone: `permit_as_umask`), is one."""
    try:
        with open(target, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if f.seek(0, 2) < 8 + length:
                _unreadable(target, "its header is cut short")
            f.seek(8)
            text = f.read(length)
    except OSError as err:
        raise UserError(f"cannot read latent cache file {target} ({err.strerror or err}); give this user read access to the "
                        "cache's files (chmod -R a+r CACHE on a cache shared between users)") from None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        _unreadable(target, "its header is not JSON")
    if not isinstance(header, dict):
        _unreadable(target, "its header is not a JSON object")
    return header, 8 + length


INT64_MAX = torch.iinfo(torch.int64).max  # the largest size or offset a tensor has


def _span(target: Path, key: str, entry, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of the tensor `key` from its header `entry`, checked against its `LAYOUT` and the
    `data_size` bytes of data the file holds."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not all(type(n) is int and 0 <= n <= INT64_MAX for n in [*shape, begin, end]):  # JSON's true is no size
            raise ValueError
    except (KeyError, TypeError, ValueError):
        _unreadable(target, f"its header entry of {key} is malformed")
    want, ndim = LAYOUT[key]
    if dtype != want or len(shape) != ndim:
        raise UserError(f"latent cache file {target} holds {key} as {dtype} of shape {shape}, where a latent cache has {want} "
                        f"of {ndim} dimensions; rebuild the cache")
    if not begin <= end <= data_size or end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        _unreadable(target, f"its {key} tensor does not fit in the file where its header places it")
    return DTYPES[dtype], shape, begin, end


def _check_apart(target: Path, spans: dict[str, tuple[torch.dtype, list[int], int, int]]) -> None:
    """`_unreadable` when the tensors `spans` (`_span`'s) overlap in the file: a header edited or overwritten, where each
    tensor of a safetensors file has bytes of its own (safetensors refuses such a file; a view of it would read one tensor's
    values as another's)."""
    ordered = sorted((begin, end) for _, _, begin, end in spans.values())
    if any(begin < end_before for (_, end_before), (begin, _) in zip(ordered, ordered[1:])):
        _unreadable(target, f"its header places {' and '.join(spans)} on the same bytes")


def _unreadable(target: Path, why: str) -> NoReturn:
    """The one line for a cache file that is not a whole safetensors file (cut short by a copy, overwritten)."""
    raise UserError(f"latent cache file {target} is unreadable ({why}); rebuild the cache")
