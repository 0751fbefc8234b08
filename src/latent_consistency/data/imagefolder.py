"""A folder of captioned images, laid out as Hugging Face `imagefolder` or with `.txt` (or `.caption`) sidecars.

Captions come from one of two places, chosen once per folder:
  - a metadata file at the root (preferred when present), as Hugging Face `imagefolder` reads them: `metadata.jsonl`,
    one JSON object per line with "file_name" (path relative to the root) and the caption under "text" or, where that is
    missing, null or blank, "caption" (a list of captions, COCO's layout, gives its first: `images.listed_caption`),
    or `metadata.csv`, a header row naming the columns "file_name" and "text" (or "caption") and a row per sample.
    A file_name written on Windows ("images\\a.png", `str` of a Windows path) names the same file on every system: its
    backslashes are folder separators where no file has the name as written (`_windows_separators`); a file_name in one
    Unicode normalisation names a file spelled in another (NFC in the metadata, NFD on a disk of macOS) where it spells no
    file exactly (`Spellings`).
    Each line or row is a sample, so an image listed twice with two captions is two samples; a folder with both files
    is refused (which one holds the captions?);
  - otherwise a sidecar next to each image: `cat.png` is captioned by `cat.txt` (its suffix in any case, as an image's),
    else by `cat.caption` (kohya's layout; `sidecar_of`).
Images are found recursively (`images.IMAGE_EXTENSIONS`: .jpg .jpeg .png .webp .bmp .gif .tif .tiff, the other still
formats Pillow decodes (.jpe, .ppm, .pgm, .tga, ...), and .avif .jfif .jp2 .psd where this Pillow decodes them; hidden files
and folders ignored, symlinked folders followed once each).

Captions are UTF-8, with or without a byte-order mark (a metadata.jsonl or metadata.csv in UTF-16 is refused, saying
so). The folder is scanned once, without decoding: images without a caption, captions that are not UTF-8 (or hold NUL
characters, as UTF-16 text does), metadata lines that do not parse or name a missing file, dangling symlinks and images
in formats not read here (.heic, .jxl, .ico, camera raw, `images.UNSUPPORTED_IMAGE_EXTENSIONS`) are
skipped and counted in `skipped`, as are metadata lines naming a file outside the folder (an absolute path, ../x.png).
Decoding happens in `__getitem__`;
a file that turns out corrupt there is counted and the next usable sample is returned instead, so one
bad file never stops a training run (`read` returns None for it: each usable sample once, for a latent cache).
Counts made in DataLoader worker processes are made in the workers' copies of
`skipped` (and logged there), which send them back with each batch (`SkipCounter.take_pending`, collected by
`data.workers.read_batches`); the scan counts are in the main process's `skipped`.

The samples are held as two UTF-8 buffers with offsets (`CaptionedFiles`), not a list of (file, caption) tuples: at the
paper's scale (LAION-Aesthetics, 12 million captioned images) a list held 3 GB in each training process, which each of
its DataLoader workers copied page by page as reading samples touched their reference counts.
"""

from __future__ import annotations

import array
import copy
import csv
import hashlib
import io
import itertools
import json
import ntpath
import os
import unicodedata
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.data import Dataset

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.images import (
    IMAGE_EXTENSIONS,
    NAMED_PER_REASON,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    SkipCounter,
    caption_problem,
    clean_caption,
    listed_caption,
    load_rgb,
)
from latent_consistency.errors import UserError
from latent_consistency.hub import given_name
from latent_consistency.prompts import utf8_error

METADATA_FILE = "metadata.jsonl"
METADATA_CSV = "metadata.csv"  # Hugging Face imagefolder's other metadata format
METADATA_FILES = (METADATA_FILE, METADATA_CSV)


class ImageFolderDataset(Dataset):
    """Map-style dataset of {"image": float32 [3, resolution, resolution] in [-1, 1], "caption": str}.

    `files`: the folder's `visible_names`, sorted, where the caller listed them already (`spec.open_dataset`, which tells
    images from shards by them), so that the folder is walked once: a walk of 12 million files takes minutes.
    `quiet_scan`: the scan's skips are counted without their log lines, in every process of a multi-process run but the
    first, which scan the same folder (a bad caption was logged once per process: 8 times on 8 GPUs).
    `holdout`: the samples are one side of a held-out split (`Holdout`), the other side's kept for `take_other_side`."""

    def __init__(self, root: str | Path, resolution: int, holdout: Holdout | None = None, files: list[str] | None = None,
                 quiet_scan: bool = False):
        self.root = Path(given_name(root, "the image folder", "a folder of captioned images"))  # "" is no current folder
        self.resolution = resolution
        self.skipped = SkipCounter(name=f"image folder {self.root}")
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist; pass a folder of images with captions")
        files = sorted(visible_names(self.root)) if files is None else files
        images = [name for name in files if extension(name) in IMAGE_EXTENSIONS]
        unsupported = [name for name in files if extension(name) in UNSUPPORTED_IMAGE_EXTENSIONS]
        if not images:
            raise UserError(
                f"no images ({' '.join(IMAGE_EXTENSIONS[:8])} ...) in {self.root}{_unsupported_note(unsupported)}; "
                "pass a folder of captioned images"
            )
        found = [self.root / name for name in METADATA_FILES if (self.root / name).is_file()]
        if len(found) > 1:
            raise UserError(f"{self.root} holds both {METADATA_FILE} and {METADATA_CSV}: keep the one that holds the captions")
        metadata = found[0] if found else self.root / METADATA_FILE
        scan = ScanSkips()
        self.samples = CaptionedFiles(self._scan_metadata(metadata, images, scan) if metadata.is_file() else self._scan_sidecars(images, files, scan))
        named = set(self.samples.files) if unsupported else set()  # metadata may name any file Pillow reads
        for file_name in unsupported:
            if file_name not in named:
                scan.add("unsupported_format", f"{file_name}: convert it to .jpg or .png")
        if not self.samples:
            source = metadata.name if metadata.is_file() else ".txt or .caption sidecar captions"
            nested = [name for name in files if Path(name).name in METADATA_FILES and "/" in name]
            where = (f"; {nested[0]} is read only at the root of the data: pass its folder as the data"
                     if nested and not metadata.is_file() else "")
            skips = self.skipped.with_counted(scan).summary()
            raise UserError(
                f"no usable captioned image in {self.root} (captions from {source}; {skips}{where}); "
                f'give each image a caption: a {METADATA_FILE} line {{"file_name": "a.png", "text": "..."}} '
                "or a.txt (or a.caption) next to a.png"
            )
        _count_scan(self.skipped, scan, quiet_scan)  # counted, and logged, now that the folder is known usable (`ScanSkips`)
        self._other_side: tuple[Holdout, CaptionedFiles, ScanSkips] | None = None  # `take_other_side`
        if holdout is not None:
            kept, apart = holdout.split(self.samples.files, "images")
            self._other_side = (holdout.other(), self.samples.take(apart), scan)
            self.samples = self.samples.take(kept)
        self._corrupt: set[int] = set()

    def take_other_side(self) -> ImageFolderDataset:
        """The other side of this folder's held-out split (of the training side: the held-out images of --eval-fraction), from
        the listing and scan this side made: opening the folder again for it walked and scanned it a second time, minutes
        at 12 million files. Its `skipped` counts the scan's skips without their log lines, which this side logged. Taken
        once: this side then holds no reference to those samples, which each DataLoader worker would carry."""
        if self._other_side is None:
            raise ValueError(f"image folder {self.root} has no other side to take: it was opened without a held-out split, or it was taken")
        holdout, samples, scan = self._other_side
        self._other_side = None
        holdout.check_filled(len(samples), len(samples) + len(self.samples), "images")
        other = copy.copy(self)
        other.samples, other.skipped, other._corrupt = samples, _count_scan(SkipCounter(name=self.skipped.name), scan, quiet=True), set()
        return other

    def _scan_metadata(self, metadata: Path, images: list[str], scan: ScanSkips) -> Iterator[tuple[str, str]]:
        """The (file name, caption) of each usable line of `metadata`; what it skips goes into `scan`, the images of `images`
        (sorted) that no line names as "no_caption". Which ones a line names is marked by bisection in `images`, not kept
        as a set of the names (a gigabyte at 12 million). An image named by a line that gives no sample (no caption, a
        dangling link) is counted once, for that line: it was counted again as "not in metadata.jsonl", and a folder of 6
        such images summed up as 12 skipped. A line names an image as spelled exactly, else in another Unicode normalisation
        (`Spellings`)."""
        try:
            lines = metadata.open("rb")  # closed by the with below: only opening it is a user's problem
        except OSError as err:
            raise UserError(f"cannot read {metadata} ({err.strerror}); make it readable") from None
        named, spellings = bytearray(len(images)), Spellings(images)
        with lines:
            rows = _csv_rows(metadata, lines) if metadata.name == METADATA_CSV else _jsonl_rows(metadata, lines)
            for number, row in rows:
                try:
                    file_name = as_posix(row["file_name"])
                except (KeyError, TypeError):  # a line that is not JSON (or not UTF-8) is one bad line, not an error for the file
                    scan.add("bad_metadata", f"{metadata}:{number}")
                    continue
                file_name = _windows_separators(self.root, file_name)
                if _outside(file_name):
                    scan.add("outside_folder", f"{metadata}:{number} names {file_name}, not a path inside {self.root}")
                    continue
                found = spellings.find(file_name)
                if isinstance(found, list):
                    scan.add("ambiguous_name", f"{metadata}:{number} names {file_name}, spelled as none of the files {', '.join(found)}, "
                             "which it names each in another Unicode normalisation; spell the one it means as its name on disk")
                    continue
                if found is not None:
                    named[found] = True
                    file_name = images[found]  # as the disk spells it: a folder made on macOS names files in NFD
                if not os.path.isfile(os.path.join(self.root, file_name)):  # False, not an OSError, for a name too long for the disk
                    scan.add("missing_file", f"{metadata}:{number} names {file_name}")
                    continue
                caption = listed_caption(row.get("text")) or listed_caption(row.get("caption"))
                if caption is None:
                    scan.add("no_caption", file_name)
                # a JSON escape such as "\ud800", which no tokenizer takes, or "\u0000"
                elif (problem := utf8_error(caption) or caption_problem(caption)) is not None:
                    scan.add("bad_caption", f"{metadata}:{number}: {problem}")
                else:
                    yield file_name, caption
        for file_name, is_named in zip(images, named):
            if not is_named:
                scan.add("no_caption", f"{file_name} is not in {metadata.name}")

    def _scan_sidecars(self, images: list[str], files: list[str], scan: ScanSkips) -> Iterator[tuple[str, str]]:
        """The (file name, caption) of each image of `images` whose sidecar (`sidecar_of`, among the folder's sorted `files`)
        is a usable caption; the others go into `scan`."""
        for file_name in images:
            path = os.path.join(self.root, file_name)
            if not os.path.isfile(path):
                scan.add("missing_file", f"{file_name} is not a file (a dangling symlink?)")
                continue
            sidecar = sidecar_of(files, file_name)
            sidecar = os.path.join(self.root, sidecar) if sidecar is not None else ""
            try:  # UTF-8, with or without a byte-order mark; anything else (UTF-16 from Notepad, Latin-1) is skipped
                caption = clean_caption(_read_bytes(sidecar).decode("utf-8-sig")) if os.path.isfile(sidecar) else None
            except UnicodeDecodeError as err:
                scan.add("bad_caption", f"{sidecar} is not UTF-8 (byte 0x{err.object[err.start]:02x})")
                continue
            except OSError as err:  # permission denied, an I/O error: this caption is lost, not the whole folder
                scan.add("bad_caption", f"{sidecar} cannot be read ({err.strerror})")
                continue
            if caption is None:
                scan.add("no_caption", file_name)
            elif (problem := caption_problem(caption)) is not None:
                scan.add("bad_caption", f"{sidecar} {problem}")
            else:
                yield file_name, caption

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """A digest of the samples in order: each one's caption, image file size and 8 samples of 4 KiB spread over the image
        file (a small image is read whole; a file renamed in place does not count). A training checkpoint records it, so
        that a run is not resumed on a folder whose images were reordered, recaptioned or replaced since, even by an image
        of the very same byte size (an uncompressed format's edit is caught where it touches a sample)."""
        stamps = _in_order(_file_sample_digest, (os.path.join(self.root, file_name) for file_name in self.samples.files))
        return _rows_digest(zip(self.samples.captions, stamps))

    def size_fingerprint(self) -> str:
        """The digest checkpoints recorded before `fingerprint` sampled the images' bytes: each sample's caption and image file
        size alone. Such a checkpoint resumes on the folder it was written on, with the check it was written with, where
        comparing it with `fingerprint` would call every image changed."""
        def size(file_name: str) -> int:
            try:
                return os.stat(os.path.join(self.root, file_name)).st_size
            except OSError:
                return -1

        return _rows_digest((caption, size(file_name)) for file_name, caption in self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """Sample `index`, or if its image is corrupt the next usable one (wrapping around)."""
        n = len(self.samples)
        for offset in range(n):
            j = (index + offset) % n
            if j in self._corrupt:
                continue
            sample = self.read(j)
            if sample is not None:
                return sample
            self._corrupt.add(j)
        raise UserError(f"no image in {self.root} could be decoded ({self.skipped.summary()}); check the files")

    def read(self, index: int) -> dict[str, torch.Tensor | str] | None:
        """Sample `index` itself, None when its image is corrupt (counted in `skipped`): what a latent cache writes, each usable
        sample once, where `__getitem__`'s stand-in would be a second copy of the next sample."""
        file_name, caption = self.samples[index]
        image = load_rgb(self.root / file_name, self.resolution, self.skipped)
        return None if image is None else {"image": image, "caption": caption}


class Spellings:
    """Which of an image folder's files (`images`, sorted) a metadata file_name names: the one spelled exactly so, else the
    one whose name is the same text in another Unicode normalisation. A folder made on macOS names its files in NFD
    ("e" and a combining accent) and a metadata file typed or written by a program names them in NFC ("é"): the images
    were skipped, each line as "missing_file" and each image as "not in metadata.jsonl", two names that print alike.
    Names compare by their NFC form; two files whose names differ only in normalisation are both kept, each named only by
    its exact spelling (`find` gives a list of both for a line that spells neither). Only the names that are not in NFC
    are held a second time: on a folder of 12 million ASCII names, none."""

    def __init__(self, images: list[str]):
        self.images = images
        self.other_forms: dict[str, list[int]] = {}  # NFC form of each name that is not in NFC: the indices of its files
        for i, name in enumerate(images):
            if not unicodedata.is_normalized("NFC", name):
                self.other_forms.setdefault(unicodedata.normalize("NFC", name), []).append(i)

    def find(self, file_name: str) -> int | list[str] | None:
        """The index in `images` of the file `file_name` names; None for no image (a missing file, one not listed as an
        image); the names of the files it could name where it spells none of them exactly and two or more alike."""
        if (i := self._exact(file_name)) is not None:
            return i
        nfc = unicodedata.normalize("NFC", file_name)
        alike = [i for i in [self._exact(nfc), *self.other_forms.get(nfc, ())] if i is not None]
        if len(alike) > 1:
            return [self.images[i] for i in alike]
        return alike[0] if alike else None

    def _exact(self, file_name: str) -> int | None:
        i = bisect_left(self.images, file_name)
        return i if i < len(self.images) and self.images[i] == file_name else None


class ScanSkips:
    """What an image folder's scan skipped, held until the folder is known usable and then counted in its `SkipCounter`,
    which logs each reason's first one: a folder refused for want of a usable caption (or mid-scan, a metadata.csv that is
    not UTF-8) is the one line of its error, which sums the skips up, not a log line per reason above it. Each reason's
    first NAMED_PER_REASON details are kept in order, as a SkipCounter names them, and the rest only counted: a refused
    folder of 12 million uncaptioned images holds no 12 million names. Iterated, it gives (reason, detail) events that
    count the same (`SkipCounter.with_counted`)."""

    def __init__(self):
        self.named: dict[str, list[str]] = {}
        self.unnamed: Counter = Counter()

    def add(self, reason: str, detail: str) -> None:
        details = self.named.setdefault(reason, [])
        if len(details) < NAMED_PER_REASON:
            details.append(detail)
        else:
            self.unnamed[reason] += 1

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for reason, details in self.named.items():
            yield from ((reason, detail) for detail in details)
        for reason, count in self.unnamed.items():
            yield from itertools.repeat((reason, ""), count)


class Strings(Sequence):
    """Strings in one growing UTF-8 buffer with the end offset of each in an array of 64-bit integers: about the bytes of
    the text and 8 more a string, where a list holds a Python object of 49 bytes and more a string, and pages that
    DataLoader worker processes forked from this one share, where they copy a list's page by page as reading its items
    touches their reference counts. Any Python string comes back as it went in, lone surrogates included (a file name
    that is not UTF-8, as os.walk gives it)."""

    ENCODING = ("utf-8", "surrogatepass")

    def __init__(self, strings: Iterable[str] = ()):
        self._text, self._ends = bytearray(), array.array("q")
        for string in strings:
            self.append(string)

    def append(self, string: str) -> None:
        self._text += string.encode(*self.ENCODING)
        self._ends.append(len(self._text))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Strings(self[j] for j in range(len(self))[i])
        i = range(len(self))[i]  # an IndexError past the end, as a list's
        return self._text[self._ends[i - 1] if i else 0 : self._ends[i]].decode(*self.ENCODING)


class CaptionedFiles(Sequence):
    """An image folder's samples, (file name relative to the root, caption) each, in two `Strings`: `files` and `captions`.
    Equal to any sequence of the same pairs (a list of tuples, as the samples were held before)."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self.files, self.captions = Strings(), Strings()
        for file_name, caption in pairs:
            self.files.append(file_name)
            self.captions.append(caption)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self.files[i], self.captions[i]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def take(self, indices: Iterable[int]) -> CaptionedFiles:
        """The samples at `indices`, in their order (one side of a held-out split)."""
        return CaptionedFiles(self[i] for i in indices)


def _count_scan(counter: SkipCounter, scan: ScanSkips, quiet: bool) -> SkipCounter:
    """`counter`, with what a folder's scan skipped counted in it, each reason's first one logged unless `quiet`."""
    counter.quiet = quiet
    for reason, detail in scan:
        counter.add(reason, detail)
    counter.quiet = False
    return counter


def _outside(file_name: str) -> bool:
    """Whether a metadata file_name leaves the folder (absolute, or up through ".."): Hugging Face imagefolder reads the
    files under its data folder only, and a metadata file downloaded with a dataset must not make a run train on (and a
    shared model learn) other images of the machine, such as /home/me/Pictures/id.jpg, or C:\\Users\\me\\id.jpg of a
    metadata file written on Windows, on any system."""
    return os.path.isabs(file_name) or ntpath.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == ".."


# The suffixes of an image's sidecar caption, in the order they are looked for: .txt in any case, as image suffixes are
# read in any case (a camera's IMG_0001.JPG is captioned by IMG_0001.TXT), then kohya's .caption (as webdataset shards'
# key.caption)
SIDECAR_SUFFIXES = (*dict.fromkeys("." + "".join(letters) for letters in itertools.product(*zip("txt", "TXT"))), ".caption", ".CAPTION")


def sidecar_of(files: list[str], image: str) -> str | None:
    """The sidecar caption file of `image` among `files` (a folder's `visible_names`, sorted): its name with the first of
    SIDECAR_SUFFIXES that names one of `files` for its suffix; None where none does. Looked up by bisection, for a scan
    of 12 million images holds no set of their names."""
    stem = os.path.splitext(image)[0]
    for suffix in SIDECAR_SUFFIXES:
        i = bisect_left(files, stem + suffix)
        if i < len(files) and files[i] == stem + suffix:
            return files[i]
    return None


def _windows_separators(root: Path, file_name: str) -> str:
    """A metadata file_name with its backslashes read as folder separators, as Windows reads them, where no file under
    `root` has the name as written: a metadata file written on Windows names "images\\a.png", which named a missing file
    elsewhere, and each image was skipped twice over ("missing_file" for its line, "no_caption" for its file). A file whose
    own name holds a backslash (legal off Windows) is still the one it names."""
    if "\\" not in file_name or os.path.lexists(os.path.join(root, file_name)):
        return file_name
    return as_posix(file_name.replace("\\", "/"))


def _jsonl_rows(metadata: Path, lines) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line of a metadata.jsonl; None for a line that is not JSON in
    UTF-8. A file in UTF-16 is a UserError (`_check_not_utf16`)."""
    for number, line in enumerate(lines, start=1):
        if number == 1:
            _check_not_utf16(metadata, line)
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield number, None


def _check_not_utf16(metadata: Path, first_line: bytes) -> None:
    """UserError for a metadata.jsonl whose first line is UTF-16 (a byte-order mark FF FE or FE FF, or the NUL bytes of
    UTF-16 text without one: Windows PowerShell 5 writes files so with `>` or Out-File), as for a metadata.csv that is
    not UTF-8: each of its lines was counted as a bad line, and one more for the NUL byte after the last line break."""
    if first_line.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark, which no UTF-8 text starts with
        start = 0
    elif b"\x00" in first_line:
        start = first_line.index(b"\x00")
    else:
        return
    raise UserError(f"{metadata} is not UTF-8 text (byte 0x{first_line[start]:02x} at {start}: UTF-16?); save it as UTF-8")


def _csv_rows(metadata: Path, lines) -> Iterator[tuple[int, dict]]:
    """(line number, {column: value}) of each row of a metadata.csv after its header (Hugging Face imagefolder's CSV: a
    header row naming "file_name" and the caption column); a row of other length than the header is one bad row. A file
    that is not UTF-8 text or has no "file_name" column is a UserError."""
    try:
        text = lines.read().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{metadata} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at {err.start}); save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or "file_name" not in header:
            raise UserError(f'{metadata} has no "file_name" column in its header row; its first line must name the columns, '
                            "e.g. file_name,text")
        start = reader.line_num
        for values in reader:
            if any(value.strip() for value in values):  # a blank line is no sample
                yield start + 1, dict(zip(header, values)) if len(values) == len(header) else None
            start = reader.line_num
    except csv.Error as err:  # a NUL byte, an unterminated quote at the end of the file
        raise UserError(f"{metadata} is not a readable CSV file (line {reader.line_num}: {err}); save it as CSV in UTF-8") from None


def visible_names(root: Path) -> Iterator[str]:
    """The path relative to `root` ("a/b.png", "/" between parts) of every file under `root` but hidden ones (a name, or a
    folder on the way, starting with "."), one folder after another. Symlinked folders are followed, each real folder
    once, so a link back up the tree does not loop; dangling symlinks are listed. A folder that cannot be read is a
    UserError. Strings, not Path objects: each training process scans the folder, and making a Path of each of 12
    million files took most of the scan's time."""
    seen = set()
    for folder, folders, names in os.walk(root, onerror=_unreadable_folder, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # sorted: the same folder wins each time
        inside = os.path.relpath(folder, root)
        prefix = "" if inside == os.curdir else inside.replace(os.sep, "/") + "/"
        yield from (prefix + name for name in names if not name.startswith("."))


def linked_paths(root: Path, suffixes: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
    """(real path, the link's own path) of each symlink under `root` that reading it as data follows, as `visible_names`
    walks it: a symlinked folder, and a symlinked file of `suffixes` (images, .tar shards). Held-out data is checked
    against these (`spec.read_paths`): a link in --data into --eval-data reads held-out images. One listing of each
    folder, each real one once, hidden names left out, without a stat of each file (a directory entry says whether it is a
    link): a folder of 12,000 images takes milliseconds. A folder that cannot be listed is passed over: reading the data
    refuses it."""
    seen, folders = set(), [str(root)]
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as listing:
                entries = [entry for entry in listing if not entry.name.startswith(".")]
        except OSError:
            continue
        for entry in entries:
            is_folder = entry.is_dir()  # through a link, as os.walk(followlinks=True) goes
            if is_folder:
                folders.append(entry.path)
            if entry.is_symlink() and (is_folder or extension(entry.name) in suffixes):
                yield Path(os.path.realpath(entry.path)), entry.path


def as_posix(file_name: str) -> str:
    """`Path(file_name).as_posix()` without making a Path ("." and empty parts dropped, "a/b" as it is): pathlib interns
    every part of every path it parses, and a metadata file naming 12 million files left the interpreter's table of
    interned strings at their number (37 bytes a file) for the life of the process. Exactly Path's on POSIX; elsewhere
    it is Path's (a drive, backslashes)."""
    if os.sep != "/":
        return Path(file_name).as_posix()
    if not isinstance(file_name, str):
        raise TypeError(f"a file name is a string, not {type(file_name).__name__}")
    relative = file_name.lstrip("/")
    slashes = len(file_name) - len(relative)  # POSIX keeps a leading "//" (and only two) as it is
    root = "//" if slashes == 2 else "/" if slashes else ""
    return root + "/".join(part for part in relative.split("/") if part and part != ".") or "."


def extension(file_name: str) -> str:
    """The lower-case extension of a file name, ".png": what `Path(file_name).suffix.lower()` gives for a name that is not
    hidden, without making a Path (`visible_names`)."""
    return os.path.splitext(file_name)[1].lower()


def _read_bytes(path: str) -> bytes:
    """A file's bytes, read without making a Path of it (`visible_names`): a folder of sidecars has one per image."""
    with open(path, "rb") as file:
        return file.read()


def _unreadable_folder(error: OSError) -> None:
    """`os.walk`'s onerror: a folder that cannot be listed is refused, not left out of the data without a word."""
    raise UserError(f"cannot read the folder {error.filename} ({error.strerror}); make it readable, or move it out of the data")


def _unsupported_note(unsupported: list[str]) -> str:
    """A note for the error of a folder without images, e.g. " (it holds 3 .heic files, ...)"; "" without such files."""
    if not unsupported:
        return ""
    counts = Counter(extension(name) for name in unsupported)
    held = ", ".join(f"{count} {suffix}" for suffix, count in counts.most_common())
    return f" (it holds {held} file{'s' if len(unsupported) != 1 else ''}, a format not read here: convert them to .jpg or .png)"


FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 8, 4096
# Threads a fingerprint reads files on, and the files each reads in one go: on a network disk each open waits for the server
FINGERPRINT_THREADS, FINGERPRINT_CHUNK = 8, 256


def _rows_digest(rows: Iterable[tuple]) -> str:
    """The first 16 hex digits of the SHA-256 of `json.dumps(list(rows))` (`hash_json_list`): the digest checkpoints have
    always recorded."""
    digest = hashlib.sha256()
    hash_json_list(digest, rows)
    return digest.hexdigest()[:16]


def hash_json_list(digest, items: Iterable) -> None:
    """Feed `digest` the bytes of `json.dumps(list(items))` item by item, without the JSON text of every sample in memory
    at once (about 2 GB for 12 million captions)."""
    digest.update(b"[")
    for i, item in enumerate(items):
        digest.update(((", " if i else "") + json.dumps(item)).encode())
    digest.update(b"]")


def _in_order(function: Callable, items: Iterable) -> Iterator:
    """`function(item)` of each item, in order, computed on FINGERPRINT_THREADS threads, FINGERPRINT_CHUNK items a task and
    at most two tasks a thread ahead: a fingerprint opens every image of the folder (a million at the paper's scale, at
    the first checkpoint and at every resume), and one open after another waits out each one's latency on a network or
    cold disk. Stopped early (Ctrl-C, an error), the tasks not yet started are dropped: only those running are waited
    for, not the 4,096 opens queued ahead."""
    items = iter(items)
    pool = ThreadPoolExecutor(FINGERPRINT_THREADS, thread_name_prefix="fingerprint")
    try:
        ahead: deque[Future] = deque()
        while chunk := list(itertools.islice(items, FINGERPRINT_CHUNK)):
            ahead.append(pool.submit(lambda chunk: [function(item) for item in chunk], chunk))
            if len(ahead) > 2 * FINGERPRINT_THREADS:
                yield from ahead.popleft().result()
        while ahead:
            yield from ahead.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _file_sample_digest(path: Path) -> str:
    """A file's size and 8 samples of 4 KiB spread over it (the whole file up to 32 KiB), as a short digest; "" for a
    file that cannot be read (one that turns out missing at a resume differs from one that was there)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256(str(size).encode())
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(size * i // FINGERPRINT_SAMPLES)
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    except OSError:
        return ""
    return digest.hexdigest()[:16]
