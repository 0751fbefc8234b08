"""Webdataset tar shards in img2dataset's layout, streamed, resampled and exactly resumable.

A shard is an uncompressed tar (`00000.tar`) whose consecutive members share a key: `key.jpg` (or .png, .webp, ...: the
formats an image folder reads, `images.IMAGE_EXTENSIONS`) and its caption in `key.txt`, `key.text` (diffusers' webdataset scripts
read it) or `key.caption`, or in `key.json` under "caption" (or "text", in any case: LAION's column is "TEXT"; a list of
captions gives its first, `images.listed_caption`). The key is webdataset's, the name up to the first dot of
its base name, except where a key holds dots itself (`cat.01.jpg`, `cat.01.txt`): see `_sample_key`.
`ShardStream` is an infinite stream:
  1. resampling: shard after shard is drawn with replacement; draw d is chosen by an RNG seeded from
     (seed, rank, d) alone, so the sequence of shards needs no RNG state;
  2. each drawn shard is read member by member (only the image and caption bytes; no decoding);
  3. a shuffle buffer: once it holds `shuffle_buffer` samples, each new sample replaces a uniformly
     chosen one (pop p seeded from (seed, rank, p)), which is passed on;
  4. decoding (`images.decode_rgb`) on `decode_threads` threads, a few samples ahead, in order.
Ranks read disjoint shards (shard i belongs to rank i mod world_size), so their streams are disjoint
and each is deterministic.

Why plain `tarfile` and not the `webdataset` pipeline: exact resume needs the position inside a shard
and the shuffle buffer's contents, which webdataset's iterators keep in generator frames. Reading the
tar with random access (`tarfile` mode "r:") gives each sample an address (shard, byte offset, size),
so the whole position is small and explicit: the number of shards drawn and of buffer pops, the header
offset of the next member in the current shard, and the addresses and captions of the samples in the
buffer and in the decode queue. `load_state_dict` restores it and the stream goes on with exactly the
samples an uninterrupted stream would have produced; buffered images are re-read by seeking, never
decoded twice. The state is made of ints, strings and lists, so `torch.load(weights_only=True)` reads it.

Decoding runs on threads inside the stream (Pillow releases the GIL while decoding and resizing), so
the stream and its position live in the training process: use it with a DataLoader with num_workers=0;
in a worker process each worker would hold its own copy of the position, and iterating there is refused.

Skipped and converted samples are counted in `skipped`: corrupt images, samples without a caption or
without an image (a link, device or folder member is none), samples with a sparse member, captions that are not UTF-8
(or hold NUL characters, as UTF-16 text does), and truncated shards (the complete samples before the damage are used,
then the stream moves to the next shard). A sample is complete once the shard shows its end: the next sample's member
header or tar's end-of-archive block. A download cut at a member boundary or inside a header ends a shard whose last
sample may lack members (a caption after its image, or the reverse): that sample is part of the damage, neither used nor
counted as a sample without a caption or an image. If every shard of a rank has been read and every sample in it tried
without a single usable one, the stream raises UserError instead of looping forever.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import random
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from latent_consistency.data.images import IMAGE_EXTENSIONS, SkipCounter, caption_problem, clean_caption, decode_rgb_reasons, listed_caption
from latent_consistency.errors import UserError

IMAGE_KEYS = tuple(extension.removeprefix(".") for extension in IMAGE_EXTENSIONS)  # what an image folder reads
CAPTION_KEYS = ("txt", "text", "caption", "json")  # diffusers' webdataset scripts read "text;txt;caption"
# The members a sample's caption is read from, as messages name them
CAPTION_MEMBERS = ", ".join(f"key.{key}" for key in CAPTION_KEYS[:-1]) + f" or key.{CAPTION_KEYS[-1]}"

# The most shards a brace pattern may name: far above the largest public datasets' (about a million).
MAX_SHARDS = 10_000_000

# Compressed tars, which webdataset reads and this stream does not (`check_uncompressed`).
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")

# Settings a saved position only makes sense for.
_IDENTITY = ("seed", "rank", "world_size", "num_shards", "shuffle_buffer")


def expand_urls(urls: str | Path | list[str | Path]) -> list[str]:
    """Shard paths from paths, brace patterns ("data/{00000..00009}.tar", "{a,b}.tar") and globs."""
    patterns = [urls] if isinstance(urls, (str, Path)) else list(urls)
    paths: list[str] = []
    for pattern in patterns:
        for path in _expand_braces(os.path.expanduser(str(pattern))):
            if os.path.isfile(path):  # first: "photos [2024]/00000.tar" names a file, it is no glob
                paths.append(path)
            elif any(ch in path for ch in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise UserError(f"no shard matches {path}; check the glob pattern")
                _check_files(matches, path)
                paths.extend(matches)
            elif os.path.exists(path):
                raise UserError(f"shard {path} is not a file (a folder, pipe or device); give the .tar files")
            else:
                raise UserError(f"shard {path} does not exist; check the path or brace pattern")
    if not paths:
        raise UserError("no shards given; pass .tar paths, a brace pattern like data/{00000..00009}.tar, or a glob")
    check_uncompressed(paths)
    return list(dict.fromkeys(paths))


def _check_files(matches: list[str], pattern: str) -> None:
    """UserError for a glob match that is not a file (a folder, a named pipe, a device called x.tar): reading a pipe
    would wait forever for a writer, and a folder is no shard; a path given as it is was checked to be a file."""
    odd = next((match for match in matches if not os.path.isfile(match)), None)
    if odd is not None:
        raise UserError(f"{odd}, matched by {pattern}, is not a file (a folder, pipe or device); move it away or narrow the pattern")


def check_uncompressed(paths: list[str]) -> None:
    """UserError for compressed shards (00000.tar.gz), before a run starts: a position in one is a byte offset into its
    decompressed stream, which only decompressing the shard from its start reaches, for every buffered image after a
    resume. webdataset reads them; here they are decompressed once, beside the originals."""
    compressed = [path for path in paths if path.lower().endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise UserError(f"{compressed[0]} is a compressed shard{f' (and {len(compressed) - 1} more)' if len(compressed) > 1 else ''}; "
                        "shards are read as uncompressed .tar files (exact resume seeks in them): decompress them, e.g. "
                        "gunzip -k *.tar.gz, and pass the .tar files")


def _expand_braces(pattern: str) -> list[str]:
    """Expand the first top-level {...} group (a..b zero-padded integer range, or a,b,c list), recursively."""
    depth = 0
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
                alternatives = _brace_alternatives(body)
                if alternatives is None:  # "{x}": a literal, as in the shell
                    alternatives = ["{" + choice + "}" for choice in _expand_braces(body)]
                else:
                    alternatives = [choice for alternative in alternatives for choice in _expand_braces(alternative)]
                rests = _expand_braces(tail)
                _check_shard_count(len(alternatives) * len(rests), pattern)
                return [head + choice + rest for choice in alternatives for rest in rests]
    return [pattern]


def _check_shard_count(count: int, pattern: str) -> None:
    """UserError for a brace pattern naming more than MAX_SHARDS paths (a range with a digit too many), before they are
    listed: listing a billion names would take the memory and the minutes of a hang."""
    if count > MAX_SHARDS:
        raise UserError(f"the brace pattern {pattern} names {count:,} shards, more than {MAX_SHARDS:,}; check its ranges "
                        "(data/{00000..00099}.tar names 100 shards)")


def _brace_alternatives(body: str) -> list[str] | None:
    """The choices a brace group's body stands for, or None if it is not a range or a list."""
    match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if match:
        first, last = match.groups()
        _check_shard_count(abs(int(last) - int(first)) + 1, "{" + body + "}")
        width = max(len(first), len(last)) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    alternatives, depth, current = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            alternatives.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    alternatives.append(current)
    return alternatives if len(alternatives) > 1 else None


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split: "dir/000123.jpg" -> ("dir/000123", "jpg"); None without a dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


@dataclass
class OncePosition:
    """Where a reading of each usable sample once (`ShardStream.samples_once`) is: past the sample whose first member's
    header lies at byte `after` of shard `shard` (an index into `ShardStream.shards`; `after` -1: before the shard's first
    sample; `shard` len(shards): every shard read). `samples_once` moves it to each sample as it hands it out, and to the end
    once the last shard is read: at those moments the reading has counted the skips of exactly the samples before it, so
    a latent cache's progress record keeps it beside its whole shards and their skip counts, and a rerun goes on from it
    (`latent_cache.UsableBatches`). Headers are read again up to it, the images and captions before it not."""

    shard: int = 0
    after: int = -1


@dataclass(slots=True)
class _Sample:
    """One sample's address in its shard, its caption and (until decoded) its image bytes."""

    shard: int  # index into ShardStream.shards
    offset: int  # byte offset of the image data in the shard
    size: int
    caption: str
    first_read: bool = False  # from the first read of its shard in this process (see _check_usable)
    data: bytes | None = None

    def address(self) -> list[Any]:
        return [self.shard, self.offset, self.size, self.caption]


def _shards_name(shards: list[str], rank: int, world_size: int) -> str:
    """How the log names a stream's shards: by the first of them, and by the rank that reads them where there are several."""
    ranks = f" of rank {rank}/{world_size}" if world_size > 1 else ""
    return f"shards{ranks} ({shards[0]}, ...)"


class ShardStream(IterableDataset):
    """Infinite stream of {"image": float32 [3, resolution, resolution] in [-1, 1], "caption": str}."""

    def __init__(
        self,
        urls: str | Path | list[str | Path],
        resolution: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        decode_threads: int = 4,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if shuffle_buffer < 1 or decode_threads < 1:
            raise UserError("shuffle_buffer and decode_threads must be at least 1")
        all_shards = expand_urls(urls)
        if len(all_shards) < world_size:
            raise UserError(
                f"{len(all_shards)} shard(s) cannot be split over {world_size} processes: each reads shards of its own; "
                f"write at least {world_size} shards (img2dataset --number_sample_per_shard) or launch fewer processes"
            )
        self.shards = all_shards[rank::world_size]
        self.total_shards = len(all_shards)
        self.resolution = resolution
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.decode_threads = decode_threads
        self.skipped = SkipCounter(name=_shards_name(self.shards, rank, world_size))
        # The position (see state_dict).
        self._draws = 0  # shards drawn so far; the current shard is draw _draws - 1
        self._offset: int | None = None  # header offset of the next member in the current shard; None: draw next
        self._pops = 0
        self._buffer: list[_Sample] = []
        self._pending: deque[tuple[_Sample, Future | None]] = deque()  # popped, decoding, not yet yielded
        self._usable = False  # a sample has been yielded
        # For the "nothing usable" check, in this process only.
        self._seen: set[int] = set()
        self._first_untried = 0

    # --- position ---------------------------------------------------------------------------------

    def _identity(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_shards": len(self.shards),
            "shuffle_buffer": self.shuffle_buffer,
        }

    def fingerprint(self) -> str:
        """A digest of this rank's shards in order: each one's file name, size and first 16 KiB (its first member's header and
        the start of its data: a tar's size is a multiple of 10 KiB, so a shard rewritten with other images often keeps its
        size). A training checkpoint records it, so that a run is not resumed on shards renamed, reordered or rewritten since:
        a saved position addresses samples by shard index and byte offset, which in another file are other bytes."""
        def stamp(shard: str) -> tuple[int, str]:
            try:
                with open(shard, "rb") as file:
                    return os.fstat(file.fileno()).st_size, hashlib.sha256(file.read(16384)).hexdigest()
            except OSError:
                return -1, ""

        rows = [(Path(shard).name, *stamp(shard)) for shard in self.shards]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """The position just after the last sample yielded, and what was skipped until then: a shard's skips are found as it
        is read, so a resumed run's data summary would leave out those found before the resume."""
        return {
            **self._identity(),
            "draws": self._draws,
            "offset": self._offset,
            "pops": self._pops,
            "buffer": [sample.address() for sample in self._buffer],
            "pending": [sample.address() for sample, _ in self._pending],
            "usable": self._usable,
            "skipped_counts": dict(self.skipped.counts),
            "skipped_seen": sorted([reason, detail] for reason, detail in self.skipped.seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue, at the next iteration, exactly where the stream that saved `state` was."""
        saved = {key: state[key] for key in _IDENTITY}
        if saved != self._identity():
            raise UserError(
                f"the data position was saved for {saved}, this stream is {self._identity()}; "
                "resume with the same shards, seed, shuffle buffer and number of processes"
            )
        self._draws, self._offset, self._pops = state["draws"], state["offset"], state["pops"]
        self._buffer = [_Sample(*address) for address in state["buffer"]]
        self._pending = deque((_Sample(*address), None) for address in state["pending"])
        self._usable = state["usable"]
        self.skipped.counts = Counter(state.get("skipped_counts", {}))  # a position saved by an earlier version has none
        self.skipped.seen = {(reason, detail) for reason, detail in state.get("skipped_seen", [])}

    # --- iteration ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor | str]]:
        if get_worker_info() is not None:
            raise UserError(
                "webdataset shards are decoded on threads inside the stream; set the data loader's num_workers to 0"
            )
        lookahead = 2 * self.decode_threads
        cursor = _Cursor(self)
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="shard-decode")
        try:
            self._pending = deque((sample, pool.submit(self._decode, sample)) for sample, _ in self._pending)
            while True:
                while len(self._pending) < lookahead:
                    sample = self._pop_buffer(cursor)
                    self._pending.append((sample, pool.submit(self._decode, sample)))
                sample, future = self._pending.popleft()
                image, reasons = future.result()
                self._first_untried -= sample.first_read
                where = f"{self.shards[sample.shard]} at byte {sample.offset}"  # the sample, each time the stream draws it
                if image is None:  # reasons: ["corrupt"] or ["too_large"]
                    self.skipped.add(reasons[0], where)
                    self._check_usable()
                    continue
                for reason in reasons:  # a conversion named by its sample counts once, as an image folder's by its file
                    self.skipped.add(reason, where)
                self._usable = True
                yield {"image": image, "caption": sample.caption}
        finally:
            cursor.close()
            pool.shutdown(wait=False, cancel_futures=True)

    def uneven_note(self) -> str | None:
        """A note where the shards do not split evenly over the processes (shard i goes to process i mod N): each process
        draws the same share of every batch from its own shards, so the samples of a process with fewer shards are seen
        more often (3 shards on 2 processes: one shard is half of the training). None where they split evenly."""
        n, w = self.total_shards, self.world_size
        if n % w == 0:
            return None
        return (f"{n} shards over {w} processes: {n % w} of the processes read {n // w + 1} shards, the others {n // w}, and each draws "
                f"the same share of every batch from its own, so the samples of the processes with fewer shards are seen more "
                f"often; a multiple of {w} shards of like sizes trains on every sample alike")

    def samples_once(self, position: OncePosition | None = None) -> Iterator[dict[str, torch.Tensor | str]]:
        """Each usable sample of each shard once, shard after shard in order, in this thread: what an evaluation reads as
        its prompts and reference images, where the endless resampled stream would repeat some and leave others out, and
        what a latent cache encodes. Skipped samples and damaged shards are counted as the stream counts them; the stream's
        position is untouched. Given `position`, the reading starts there and moves it along (`OncePosition`): decoding
        runs here, not ahead on threads, so it is that of the samples handed out."""
        position = OncePosition() if position is None else position
        for data, caption, where, at in self._captioned_once(self.skipped, position.shard, position.after):
            image, reasons = decode_rgb_reasons(data, self.resolution)
            if image is None:
                self.skipped.add(reasons[0], where)
                continue
            for reason in reasons:
                self.skipped.add(reason, where)
            position.shard, position.after = at
            yield {"image": image, "caption": caption}
        position.shard, position.after = len(self.shards), -1

    def first_captions(self, n: int) -> list[str]:
        """The captions of the first `n` samples with an image and a caption, shard after shard in order (no image decoded):
        a run's validation prompts where it names none, as an image folder's first captions are. The stream's position and
        counts are untouched."""
        skipped = SkipCounter(name=f"validation prompts of {self.skipped.name}")
        return [caption for _, caption, _, _ in itertools.islice(self._captioned_once(skipped), n)]

    def _captioned_once(self, skipped: SkipCounter, first: int = 0, after: int = -1) -> Iterator[tuple[bytes, str, str, tuple[int, int]]]:
        """(image bytes, caption, where, (shard index, byte offset of its first member's header)) of each sample with an
        image and a caption, shard after shard in order, from shard `first` on, past its sample at byte `after`
        (`OncePosition`); what is skipped, and damaged shards, counted in `skipped`."""
        for k in range(first, len(self.shards)):
            shard = self.shards[k]
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    for group in _complete_groups(tar):
                        if k == first and group[0].offset <= after:  # read before: its headers alone are read again
                            continue
                        picked = _image_and_caption(tar, group, shard, skipped)
                        if picked is not None:
                            yield tar.extractfile(picked[0]).read(), picked[1], f"{shard}:{_sample_key(group)}", (k, group[0].offset)
            except (tarfile.TarError, OSError) as error:
                skipped.add("truncated_shard", f"{shard}: {error}")

    def _pop_buffer(self, cursor: _Cursor) -> _Sample:
        """Fill the shuffle buffer, then swap a new sample in for a seeded-random one and return that."""
        while len(self._buffer) < self.shuffle_buffer:
            self._buffer.append(cursor.next_sample())
        slot = random.Random(f"pop:{self.seed}:{self.rank}:{self._pops}").randrange(len(self._buffer))
        self._pops += 1
        sample, self._buffer[slot] = self._buffer[slot], cursor.next_sample()
        return sample

    def _decode(self, sample: _Sample) -> tuple[torch.Tensor | None, list[str]]:
        """Runs on a decode thread: the image bytes (re-read by address after a resume) to a tensor."""
        data = sample.data
        if data is None:
            with open(self.shards[sample.shard], "rb") as file:
                file.seek(sample.offset)
                data = file.read(sample.size)
        sample.data = None
        return decode_rgb_reasons(data, self.resolution)

    def _shard_of_draw(self, draw: int) -> int:
        """Index of the shard drawn at draw number `draw` (resampling with replacement)."""
        return random.Random(f"shard:{self.seed}:{self.rank}:{draw}").randrange(len(self.shards))

    def _check_usable(self) -> None:
        """UserError once every shard was read and every sample from those reads failed."""
        if not self._usable and len(self._seen) == len(self.shards) and self._first_untried == 0:
            raise UserError(
                f"no usable sample in {len(self.shards)} shard(s) ({', '.join(self.shards[:3])}"
                f"{', ...' if len(self.shards) > 3 else ''}; {self.skipped.summary()}); shards need "
                f"key.jpg/.png/.webp with a caption in {CAPTION_MEMBERS}"
            )


def check_usable(stream: ShardStream) -> None:
    """UserError now, not at the first training step, if no shard of `stream` holds a usable sample: a throwaway stream
    over the same shards reads until it yields one (or has tried every sample), so `stream`'s own position is untouched."""
    probe = ShardStream(stream.shards, stream.resolution, seed=stream.seed, shuffle_buffer=1, decode_threads=1)
    probe.skipped.quiet = True  # `stream` logs what it skips as it reads it; a refusal is its one line, which sums them up
    samples = iter(probe)
    try:
        next(samples)
    finally:
        samples.close()


class _Cursor:
    """The open shard of a ShardStream; reads one sample (a group of members sharing a key) at a time."""

    def __init__(self, stream: ShardStream):
        self.stream = stream
        self.file: IO[bytes] | None = None
        self.tar: tarfile.TarFile | None = None
        self.shard = -1
        self.lookahead: tarfile.TarInfo | None = None  # first member of the next sample
        self.first_read = False

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.file is not None:
            self.file.close()
        self.file = self.tar = self.lookahead = None

    def next_sample(self) -> _Sample:
        stream = self.stream
        while True:
            if self.tar is None:
                try:
                    self._open()
                except (tarfile.TarError, OSError) as error:
                    self._finish_shard(f"{stream.shards[self.shard]}: {error}")
                    continue
            try:
                sample = self._read_sample()
            except (tarfile.TarError, OSError) as error:
                self._finish_shard(f"{stream.shards[self.shard]}: {error}")
                continue
            if sample is None:
                continue
            if sample is _END:
                self._finish_shard(None)
                continue
            stream._first_untried += sample.first_read
            return sample

    def _open(self) -> None:
        """Open the current shard at the saved offset, or draw the next shard."""
        stream = self.stream
        resume_at = stream._offset
        if resume_at is None:
            stream._draws += 1
            resume_at = 0
        self.shard = stream._shard_of_draw(stream._draws - 1)
        stream._offset = resume_at
        self.first_read = self.shard not in stream._seen
        self.file = open(stream.shards[self.shard], "rb")  # noqa: SIM115 (open while the stream reads the shard; closed by close())
        self.tar = tarfile.open(fileobj=self.file, mode="r:")  # noqa: SIM115 (as above)
        self._advance()
        while self.lookahead is not None and self.lookahead.offset < resume_at:
            self._advance()

    def _advance(self) -> None:
        """Read the next member header; a shard that stops without tar's end-of-archive block raises ReadError
        (`_check_end`), so the sample being read, whose end the shard does not show, is dropped with the damage."""
        self.lookahead = self.tar.next()
        if self.lookahead is None:
            _check_end(self.tar)

    def _finish_shard(self, truncation: str | None) -> None:
        stream = self.stream
        if truncation is not None:
            stream.skipped.add("truncated_shard", truncation)
        self.close()
        stream._offset = None
        stream._seen.add(self.shard)
        stream._check_usable()

    def _read_sample(self) -> _Sample | None | object:
        """The next sample of the open shard; None if it was skipped (and counted); _END after the last."""
        stream = self.stream
        if self.lookahead is None:
            return _END
        group: list[tarfile.TarInfo] = []
        if _split_name(self.lookahead.name) is None:  # a directory entry or a stray member without an extension: not a sample
            self._advance()
        while self.lookahead is not None and _split_name(self.lookahead.name) is not None and _joins(group, self.lookahead):
            group.append(self.lookahead)
            self._advance()
        stream._offset = self.lookahead.offset if self.lookahead is not None else self.tar.offset
        if not group:
            return None
        picked = _image_and_caption(self.tar, group, stream.shards[self.shard], stream.skipped)
        if picked is None:
            return None
        image, caption = picked
        data = self.tar.extractfile(image).read()
        return _Sample(self.shard, image.offset_data, image.size, caption, self.first_read, data)


def _complete_groups(tar: tarfile.TarFile) -> Iterator[list[tarfile.TarInfo]]:
    """The samples of a shard read in order, each as the list of its consecutive members (`_joins`); each once the shard
    shows its end, so a shard cut off raises ReadError (`_check_end`) instead of giving a last sample that lacks members."""
    group: list[tarfile.TarInfo] = []
    for member in tar:
        if _split_name(member.name) is None:
            continue
        if not _joins(group, member):
            yield group
            group = []
        group.append(member)
    _check_end(tar)
    if group:
        yield group


def _check_end(tar: tarfile.TarFile) -> None:
    """ReadError unless the members of `tar`, which stopped (its `next()` gave None), stop at tar's end-of-archive block:
    tarfile takes a header cut short, or none at all, for the end of the archive, so a shard cut at a member boundary or
    inside a header would look whole. A cut inside the end-of-archive block itself (zeros) loses no member."""
    tar.fileobj.seek(tar.offset)
    rest = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not rest or any(rest):
        raise tarfile.ReadError(f"no end-of-archive block at byte {tar.offset}: the shard is cut off")


def _joins(group: list[tarfile.TarInfo], member: tarfile.TarInfo) -> bool:
    """Whether `member` (a name with an extension) belongs to the sample whose members so far are `group`: it has the
    sample's webdataset key and, in a sample keyed by a name with dots (`_sample_key`), that whole key too."""
    if not group:
        return True
    key, extension = _split_name(member.name)
    if key != _split_name(group[0].name)[0]:
        return False
    return "." not in extension or _sample_key(group) in (key, member.name.rpartition(".")[0])


def _sample_key(group: list[tarfile.TarInfo]) -> str:
    """The key of the sample whose members are `group`: webdataset's (the name up to the first dot of its base name) where
    a member has a one-part extension (`k.jpg`, `k.seg.png`: webdataset's key "k"); where every member's extension has a
    dot (`cat.01.jpg`, `cat.01.txt`), the first member's name up to its last dot ("cat.01"). webdataset itself makes one
    sample of every `cat.*` member in a row: a shard whose keys hold dots would be one sample without an image."""
    splits = [_split_name(member.name) for member in group]
    if any("." not in extension for _, extension in splits):
        return splits[0][0]
    return group[0].name.rpartition(".")[0]


def _image_and_caption(tar: tarfile.TarFile, group: list[tarfile.TarInfo], shard: str,
                       skipped: SkipCounter) -> tuple[tarfile.TarInfo, str] | None:
    """A sample's image member and caption, from its members (`group`, of `shard`) by extension; None, counted in
    `skipped`, for a sample without an image or a usable caption, or with a sparse member (GNU tar --sparse, never
    written by img2dataset): a few KiB of shard can claim gigabytes of zeros, which reading the member would allocate."""
    key = _sample_key(group)
    where = f"{shard}:{key}"
    if any(member.issparse() for member in group):
        skipped.add("sparse_member", where)
        return None
    members: dict[str, tarfile.TarInfo] = {}
    for member in group:
        if member.isfile():
            members.setdefault(member.name[len(key) + 1 :].lower(), member)
    image = next((members[key] for key in IMAGE_KEYS if key in members), None)
    if image is None:
        skipped.add("no_image", where)
        return None
    caption = None
    for key in CAPTION_KEYS:
        if caption is None and key in members:
            try:
                caption = _read_caption(tar.extractfile(members[key]).read(), key)
            except UnicodeError as err:
                skipped.add("bad_caption", f"{where}.{key}: {err.reason}")
                return None
    if caption is None:
        skipped.add("no_caption", where)
        return None
    if (problem := caption_problem(caption)) is not None:
        skipped.add("bad_caption", f"{where}: caption {problem}")
        return None
    return image, caption


_END = object()


def _read_caption(raw: bytes, key: str) -> str | None:
    """The caption of a sample's .txt, .text, .caption or .json member (None: it has none); UTF-8 with or without a
    byte-order mark. A JSON object's caption is its "caption" or, where that is missing or blank, its "text", in any case
    (LAION's parquet column is "TEXT"); a list of captions gives its first (`listed_caption`). Text
    that is not UTF-8, or a JSON caption escaping a lone surrogate, raises UnicodeError: the sample is skipped as a bad
    caption rather than trained on replacement characters."""
    text = raw.decode("utf-8-sig")
    if key != "json":
        return clean_caption(text)
    try:
        row = json.loads(text)
    except ValueError:
        return None
    fields = {str(name).lower(): value for name, value in row.items()} if isinstance(row, dict) else {}
    caption = listed_caption(fields.get("caption")) or listed_caption(fields.get("text"))
    if caption is not None:
        caption.encode("utf-8")  # UnicodeEncodeError on a lone surrogate ("\\ud800")
    return caption
