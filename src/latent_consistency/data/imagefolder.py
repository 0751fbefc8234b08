"""A folder of captioned images, laid out as Hugging Face `imagefolder` or with `.txt` sidecars.

Captions come from one of two places, chosen once per folder:
  - `metadata.jsonl` at the root (preferred when present): one JSON object per line with "file_name"
    (path relative to the root) and the caption under "text" or "caption". Each line is a sample, so
    an image listed twice with two captions is two samples;
  - otherwise a sidecar next to each image: `cat.png` is captioned by `cat.txt`.
Images are found recursively (.jpg .jpeg .png .webp .bmp .gif .tif .tiff; hidden folders ignored).

Captions are UTF-8, with or without a byte-order mark. The folder is scanned once, without decoding: images
without a caption, captions that are not UTF-8, metadata lines that do not parse or name a missing file are
skipped and counted in `skipped`. Decoding happens in `__getitem__`;
a file that turns out corrupt there is counted and the next usable sample is returned instead, so one
bad file never stops a training run. Counts made in DataLoader worker processes stay in the workers
(they are logged there); the scan counts are in the main process's `skipped`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.images import IMAGE_EXTENSIONS, SkipCounter, clean_caption, load_rgb
from latent_consistency.errors import UserError
from latent_consistency.prompts import utf8_error

METADATA_FILE = "metadata.jsonl"


class ImageFolderDataset(Dataset):
    """Map-style dataset of {"image": float32 [3, resolution, resolution] in [-1, 1], "caption": str}."""

    def __init__(self, root: str | Path, resolution: int, holdout: Holdout | None = None):
        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.skipped = SkipCounter(name=f"image folder {self.root}")
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist; pass a folder of images with captions")
        images = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
            and p.is_file()
        )
        if not images:
            raise UserError(
                f"no images ({' '.join(IMAGE_EXTENSIONS)}) in {self.root}; pass a folder of captioned images"
            )
        metadata = self.root / METADATA_FILE
        self.samples: list[tuple[str, str]] = (
            self._scan_metadata(metadata, images) if metadata.is_file() else self._scan_sidecars(images)
        )
        if not self.samples:
            source = METADATA_FILE if metadata.is_file() else ".txt sidecar captions"
            raise UserError(
                f"no usable captioned image in {self.root} (captions from {source}; {self.skipped.summary()}); "
                f'give each image a caption: a {METADATA_FILE} line {{"file_name": "a.png", "text": "..."}} '
                "or a.txt next to a.png"
            )
        if holdout is not None:
            self.samples = [self.samples[i] for i in holdout.select([file_name for file_name, _ in self.samples], "images")]
        self._corrupt: set[int] = set()

    def _scan_metadata(self, metadata: Path, images: list[str]) -> list[tuple[str, str]]:
        samples, captioned = [], set()
        with metadata.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:  # a line that is not UTF-8 is one bad line, not an error for the whole file
                    row = json.loads(line.decode("utf-8-sig"))
                    file_name = Path(row["file_name"]).as_posix()
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    self.skipped.add("bad_metadata", f"{metadata}:{number}")
                    continue
                if not (self.root / file_name).is_file():
                    self.skipped.add("missing_file", f"{metadata}:{number} names {file_name}")
                    continue
                caption = clean_caption(row.get("text", row.get("caption")))
                if caption is None:
                    self.skipped.add("no_caption", file_name)
                elif (problem := utf8_error(caption)) is not None:  # a JSON escape such as "\ud800", which no tokenizer takes
                    self.skipped.add("bad_caption", f"{metadata}:{number}: {problem}")
                else:
                    samples.append((file_name, caption))
                    captioned.add(file_name)
        for file_name in images:
            if file_name not in captioned:
                self.skipped.add("no_caption", f"{file_name} is not in {METADATA_FILE}")
        return samples

    def _scan_sidecars(self, images: list[str]) -> list[tuple[str, str]]:
        samples = []
        for file_name in images:
            sidecar = (self.root / file_name).with_suffix(".txt")
            try:  # UTF-8, with or without a byte-order mark; anything else (UTF-16 from Notepad, Latin-1) is skipped
                caption = clean_caption(sidecar.read_bytes().decode("utf-8-sig")) if sidecar.is_file() else None
            except UnicodeDecodeError as err:
                self.skipped.add("bad_caption", f"{sidecar} is not UTF-8 (byte 0x{err.object[err.start]:02x})")
                continue
            if caption is None:
                self.skipped.add("no_caption", file_name)
            else:
                samples.append((file_name, caption))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """Sample `index`, or if its image is corrupt the next usable one (wrapping around)."""
        n = len(self.samples)
        for offset in range(n):
            j = (index + offset) % n
            if j in self._corrupt:
                continue
            file_name, caption = self.samples[j]
            image = load_rgb(self.root / file_name, self.resolution, self.skipped)
            if image is not None:
                return {"image": image, "caption": caption}
            self._corrupt.add(j)
        raise UserError(f"no image in {self.root} could be decoded ({self.skipped.summary()}); check the files")
