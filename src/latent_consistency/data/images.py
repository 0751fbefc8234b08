"""Image decoding shared by the image-folder and webdataset-shard datasets and the init-image readers.

Every image goes through `open_rgb8`: decode, turn upright by its EXIF orientation, convert to 8-bit RGB.
Every training image then goes through `decode_rgb`: resize the shorter side to the training resolution,
center-crop, and scale to float32 [3, H, W] in [-1, 1] (the range the VAE encodes). Bad bytes never
raise there: they come back as `None` so a dataset can skip and count the sample.

Conversions to 8-bit RGB:
  - grayscale ("1", "L") is replicated to three channels;
  - images with alpha ("LA", "RGBA", "PA") or a transparency key (a PNG's tRNS chunk in a palette, gray, 16-bit gray or RGB
    image; a GIF's transparent index) are composited on white, so a transparent background becomes white, not the
    arbitrary colour stored under alpha = 0;
  - 16-bit grayscale ("I;16*", and "I" holding values in 0..65535, as Pillow reads a 16-bit PGM) is scaled by
    255/65535 with rounding, not clipped at 255 (clipping turns nearly every 16-bit image white);
  - 32-bit float grayscale ("F", a float TIFF) holding values in [0, 1], the scale float images have in scikit-image and
    OpenCV, is scaled by 255 with rounding (Pillow's own conversion reads it on a 0-255 scale: a black image);
  - palette, CMYK and the other modes go through Pillow's own conversion.
Each conversion is reported as a reason ("converted_grayscale", "converted_alpha", "converted_16bit", "converted_float",
"converted_palette", "converted_cmyk", ...) so datasets can count them in the log; so is an image whose shorter side is
below the training resolution, which is upscaled to it ("converted_upscaled": blurrier than the rest of the data).
A float image with values outside [0, 1] (depth in metres, linear HDR light) or an "I" image beyond 16 bits (a 32-bit
integer TIFF) has no scale the file states: it is refused (`UnknownScale`), and a dataset skips it as "unknown_scale".

Images of Pillow's `Image.MAX_IMAGE_PIXELS` (89 M pixels) to twice that (a medium-format photo, a scan) are decoded
without Pillow's DecompressionBombWarning, which the process that decodes here ignores from then on (Python before 3.14
has no thread-safe way to silence one warning around a call, and decoding runs on threads): they are whole images, used
downscaled to the training size (a JPEG decoded at 1/2 to 1/8 of its size already). Larger ones are refused as Pillow
refuses them ("too_large").
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger("latent_consistency.data")

# Images a phone, camera or editor writes besides the common formats: read where this Pillow decodes them (it registers
# their extension: AVIF, JFIF, JPEG 2000 and PSD in Pillow 13; HEIC with the pillow-heif plugin); otherwise a folder's
# files of these are counted as skipped ("unsupported_format"), not passed over without a word.
_OTHER_EXTENSIONS = (".heic", ".heif", ".avif", ".jfif", ".jxl", ".jp2", ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw")
# Still images in formats Pillow itself decodes (`Image.registered_extensions()`): JPEG's other suffix and its multi-picture
# form (a 3D camera's: the first picture), animated PNG (its first frame, as a GIF's), Netpbm (the .pgm of 16-bit gray
# scans), Targa, device-independent bitmaps, QOI, PCX, SGI, Sun raster and JPEG 2000's other suffixes. Read where this
# Pillow registers them; a file of one it does not is counted as unsupported.
_PILLOW_EXTENSIONS = (".jpe", ".mpo", ".apng", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".dib", ".qoi", ".pcx", ".sgi", ".rgb",
                      ".ras", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx")
# Image formats not read here: icons, textures, vector art, HDR (no scale to 8 bits a file states), JPEG XR and camera raw.
# A folder's files of these are counted as "unsupported_format" too, so that the data summary names a captioned one
# rather than say "nothing skipped".
_UNREAD_EXTENSIONS = (".ico", ".icns", ".cur", ".dds", ".xbm", ".xpm", ".eps", ".exr", ".hdr", ".pfm", ".jxr", ".wdp", ".raw",
                      ".orf", ".rw2", ".raf", ".pef", ".srw", ".crw", ".cr3")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff") + tuple(
    extension for extension in _OTHER_EXTENSIONS + _PILLOW_EXTENSIONS if extension in Image.registered_extensions())
UNSUPPORTED_IMAGE_EXTENSIONS = tuple(
    extension for extension in _OTHER_EXTENSIONS + _PILLOW_EXTENSIONS + _UNREAD_EXTENSIONS if extension not in IMAGE_EXTENSIONS)

_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit, 16-bit data in it (`_scaled_gray`)
_KEYED_MODES = ("P", "1", "L", "RGB", *_SIXTEEN_BIT_MODES)  # modes whose transparency may be a key (`_keyed_rgba`)


@dataclass
class SkipCounter:
    """Counts samples skipped or converted, per reason, and logs them as they happen.

    Reasons starting with "converted_" are samples that were used after a conversion; every other
    reason ("corrupt", "no_caption", "missing_file", "truncated_shard", ...) is a sample or shard that
    was skipped. The first occurrence of each reason is logged with its detail (a file name), then
    the running count at 10, 100, 1000, ... so a large dataset does not flood the log. A sample named by its detail
    counts once however often it is drawn (an image folder is read once per epoch); one without a detail counts
    each time. The first NAMED_PER_REASON samples of a reason are remembered by name; later ones are counted as
    samples without a detail, for `seen` goes into every training checkpoint: a million images of which 5% are grayscale
    would list 50,000 paths in each. Past that many, a sample read again in a later epoch counts again.
    """

    name: str = "dataset"
    counts: Counter = field(default_factory=Counter)
    seen: set = field(default_factory=set)  # (reason, detail) already counted, at most NAMED_PER_REASON of each reason
    # (reason, detail) counted since the last `take_pending`; None: not kept (a counter nobody collects from)
    pending: list | None = None
    quiet: bool = False  # counted without a log line: a throwaway reader's (`shards.check_usable`), whose samples are read again

    def add(self, reason: str, detail: str = "") -> None:
        if detail:
            if (reason, detail) in self.seen:
                return
            if self._named()[reason] < NAMED_PER_REASON:
                self.seen.add((reason, detail))
                self._named()[reason] += 1
            else:
                detail = ""
        if self.pending is not None:
            self.pending.append((reason, detail))
        self.counts[reason] += 1
        count = self.counts[reason]
        if not self.quiet and (count == 1 or _is_power_of_ten(count)):
            level = logging.INFO if reason.startswith("converted_") else logging.WARNING
            where = f" ({detail})" if detail and count == 1 else ""
            logger.log(level, "%s: %s x%d%s", self.name, reason, count, where)

    def _named(self) -> Counter:
        """The number of (reason, detail) pairs of each reason in `seen`, counted once from `seen` as it was set (a copy,
        a checkpoint's) and kept up to date by `add`."""
        if getattr(self, "_named_of", None) is not self.seen:
            self._named_of, self._named_counts = self.seen, Counter(reason for reason, _ in self.seen)
        return self._named_counts

    def take_pending(self) -> list[tuple[str, str]]:
        """The (reason, detail) counted since the last call: what a copy of this counter in a DataLoader worker sends
        back with each batch, only what is new (a whole copy would grow with the data)."""
        taken, self.pending = self.pending or [], []
        return taken

    def with_counted(self, events: Iterable[tuple[str, str]]) -> SkipCounter:
        """A copy with `events` (other copies' `take_pending`) counted too, without logging them again: a sample named by
        its detail counts once however many copies counted it, one without a detail once per event."""
        merged = SkipCounter(name=self.name, counts=self.counts.copy(), seen=set(self.seen))
        for reason, detail in events:
            if detail:
                if (reason, detail) in merged.seen:
                    continue
                merged.seen.add((reason, detail))
            merged.counts[reason] += 1
        return merged

    def summary(self) -> str:
        """One line, e.g. "skipped: corrupt=1, no_caption=2; converted: grayscale=3"."""
        skipped = {r: n for r, n in sorted(self.counts.items()) if not r.startswith("converted_")}
        converted = {
            r.removeprefix("converted_"): n for r, n in sorted(self.counts.items()) if r.startswith("converted_")
        }
        parts = [
            f"{label}: " + ", ".join(f"{r}={n}" for r, n in group.items())
            for label, group in (("skipped", skipped), ("converted", converted))
            if group
        ]
        return "; ".join(parts) if parts else "nothing skipped or converted"


# The samples of one reason a `SkipCounter` names (and a checkpoint lists); the log names the first of them
NAMED_PER_REASON = 1000


class SkipEvents:
    """What copies of a `SkipCounter` in DataLoader worker processes counted (their `take_pending`, added with +=), for
    `SkipCounter.with_counted`: each sample named by its detail once, and those without a detail (past NAMED_PER_REASON of
    a reason, or never named) as a count per reason. A list kept one event per unnamed sample for the whole run: at the
    paper's scale, millions of ("converted_grayscale", "") in each training process. Iterated, it gives the events that
    count the same."""

    def __init__(self):
        self.named: set[tuple[str, str]] = set()
        self.unnamed: Counter = Counter()

    def __iadd__(self, events: Iterable[tuple[str, str]]) -> SkipEvents:
        for reason, detail in events:
            if detail:
                self.named.add((reason, detail))
            else:
                self.unnamed[reason] += 1
        return self

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from self.named
        for reason, count in self.unnamed.items():
            yield from itertools.repeat((reason, ""), count)

    def __bool__(self) -> bool:
        return bool(self.named or self.unnamed)


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


class UndecodableImage(ValueError):
    """Bytes or a file that are not a whole image Pillow can decode; the message says why in a few words."""


class TooManyPixels(UndecodableImage):
    """An image with more pixels than its reader allows, refused from its header before it is decoded."""


class UnknownScale(UndecodableImage):
    """A float or 32-bit integer image whose values fit no scale its file states (a float outside [0, 1], an integer beyond
    16 bits), refused after decoding: which value is white is a guess."""


def open_rgb8(source: bytes | str | Path, draft_size: tuple[int, int] | None = None,
              max_pixels: int | None = None) -> tuple[Image.Image, str | None]:
    """Decode an image as every reader of images does (training data and init images): turned upright by its EXIF
    orientation, then converted to 8-bit RGB (`_to_rgb8`: alpha composited on white, 16-bit scaled, ...).

    Returns (image, reason): reason names the conversion, None for an 8-bit RGB image. `draft_size` lets a JPEG decoder
    downscale while decoding (both sides stay at least that size). Raises `TooManyPixels` for an image over `max_pixels`
    or over Pillow's own limit (twice `Image.MAX_IMAGE_PIXELS`), `UndecodableImage` for anything Pillow cannot decode in
    full (a truncated file included, and a PNG whose image data holds fewer rows than its header says: `_load_png`),
    `UnknownScale` for a float or 32-bit image without a known scale (`_to_rgb8`).
    """
    _ignore_bomb_warning()
    try:
        with _opened(source) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise TooManyPixels(f"{image.width}x{image.height} px, more than {max_pixels} pixels")
            if draft_size is not None:
                image.draft(image.mode, draft_size)
            if image.format == "PNG":
                _load_png(image, source)
            else:
                image.load()  # forces the full decode, so a truncated file fails here and not later
            return _to_rgb8(_upright(image))  # a new image: it outlives the file
    except UndecodableImage:
        raise
    except Image.DecompressionBombError:  # a whole image, only a very large one: not to be reported as damaged
        raise TooManyPixels(f"more than Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels; downscale it") from None
    # Pillow's decoders signal malformed input with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # struct.error, zlib.error, ...): all of them mean "not an image Pillow can decode".
    except Exception as err:
        raise UndecodableImage(f"not an image file Pillow can decode ({err.__class__.__name__})") from err


def _opened(source: bytes | str | Path) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


# What a PNG's pixel memory holds before its first decode (`_load_png`), per band: non-zero in each, unlike the second's
_PNG_FILL = (90, 127, 164, 201)


def _load_png(image: Image.Image, source: bytes | str | Path) -> None:
    """`image.load()` for a PNG, refusing one whose image data holds fewer rows than its header says (`UndecodableImage`):
    a buggy writer's file, every chunk and CRC valid and the zlib stream complete, only short. Pillow's decoder stops
    where the stream ends, without an error, and the rows it never reached stay black.

    The decoder writes whole rows in order, so the last row is written only if every row is; when interlaced, the last
    odd row, all of which Adam7's last pass writes (in a one-row image, the row, parts of which every pass writes). The
    pixel memory is filled with `_PNG_FILL` before decoding, and a last row that then differs from the fill anywhere was
    written: the check costs that fill. A last row equal to the fill (a short file, or a row of exactly that colour; any
    row of a one-row interlaced image) is compared with a second decode's, into zeros: a pixel the data holds comes out the
    same both times, one it lacks as the fill and as 0."""
    _load_filled(image, _PNG_FILL)
    row = image.height - 1
    if image.info.get("interlace"):
        row -= 1 - row % 2  # the last odd row; -1 in a one-row image
    last = (0, max(row, 0), image.width, max(row, 0) + 1)
    fill_row = Image.new(image.mode, (image.width, 1), _fill_colour(image, _PNG_FILL)).tobytes()
    if row >= 0 and image.crop(last).tobytes() != fill_row:
        return
    with _opened(source) as again:
        _load_filled(again, (0, 0, 0, 0))
        if again.crop(last).tobytes() != image.crop(last).tobytes():
            raise UndecodableImage(f"a PNG whose image data ends before its last row (its header says {image.height}): a "
                                   "truncated or badly written file; re-save it")


def _load_filled(image: Image.Image, colour: tuple[int, ...]) -> None:
    """Decode `image` (an unloaded PNG) into pixel memory filled with `colour`, not Pillow's zeros. Pillow allocates the
    memory only when the image has none (`ImageFile.load_prepare`); the test of short PNGs checks that it still does."""
    image.im = Image.new(image.mode, image.size, _fill_colour(image, colour)).im
    image.load()


def _fill_colour(image: Image.Image, colour: tuple[int, ...]) -> int | tuple[int, ...]:
    bands = len(image.getbands())
    return colour[0] if bands == 1 else colour[:bands]


_BOMB_WARNING_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)  # as warnings.filterwarnings stores it


def _ignore_bomb_warning() -> None:
    """Ignore Pillow's DecompressionBombWarning in this process, if not yet (or no longer: a `warnings.catch_warnings` block
    around a call restores the filters it found): an image up to twice Pillow's limit is decoded, and its two-line warning
    on the user's terminal says nothing to act on. Checked per image, so the filter list is changed once, not per image."""
    if _BOMB_WARNING_FILTER not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned by its EXIF orientation; as stored (as a browser shows it) when its EXIF block is unreadable, for
    only the orientation is lost then, not the pixels."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # Pillow's EXIF parser fails with SyntaxError, struct.error, ValueError, ... on a malformed block
        return image.copy()


def decode_rgb(source: bytes | str | Path, resolution: int) -> tuple[torch.Tensor | None, str | None]:
    """Decode an image to float32 [3, resolution, resolution] in [-1, 1].

    Returns (image, reason): image is None and reason "corrupt" when the bytes are not a complete image Pillow can decode,
    "too_large" when it has more pixels than Pillow decodes, "unknown_scale" for a float or 32-bit image without a known
    scale (`UnknownScale`); otherwise reason names the mode conversion applied ("converted_grayscale", ...), or
    "converted_upscaled" for an 8-bit RGB image smaller than `resolution`, or is None. `decode_rgb_reasons` gives every
    reason of an image. Pure function of its input, safe to call from several threads.
    """
    image, reasons = decode_rgb_reasons(source, resolution)
    return image, reasons[0] if reasons else None


def decode_rgb_reasons(source: bytes | str | Path, resolution: int) -> tuple[torch.Tensor | None, list[str]]:
    """`decode_rgb` with all its reasons: ["corrupt"], ["too_large"] or ["unknown_scale"] with None, else the mode
    conversion (if any) and "converted_upscaled" when the image's shorter side is below `resolution` (if so), which a
    dataset counts each."""
    image, reason = _decode_rgb(source, resolution)
    return image, [r for r in reason if r is not None]


def _decode_rgb(source: bytes | str | Path, resolution: int) -> tuple[torch.Tensor | None, tuple[str | None, ...]]:
    try:
        # JPEG decoders can downscale by 1/2, 1/4, 1/8 while decoding, keeping both sides >= the
        # requested size: far cheaper than decoding a large photo in full and resizing it.
        image, reason = open_rgb8(source, draft_size=(resolution, resolution))
    except TooManyPixels:
        return None, ("too_large",)
    except UnknownScale:
        return None, ("unknown_scale",)
    except UndecodableImage:  # bad bytes of any kind mean "skip this sample", never a crash of the training run
        return None, ("corrupt",)
    upscaled = "converted_upscaled" if min(image.size) < resolution else None
    array = np.asarray(_resize_center_crop(image, resolution))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0, (reason, upscaled)


def load_rgb(
    source: bytes | str | Path, resolution: int, counter: SkipCounter | None = None
) -> torch.Tensor | None:
    """`decode_rgb` without the reason: None for undecodable, truncated or too large images, never raises for them.

    If counter is given, each reason (`decode_rgb_reasons`: the conversions, "corrupt", "too_large" or "unknown_scale") is
    counted in it.
    A path that is not a regular file (a named pipe or a device called x.png in a folder of images, a dangling link) is
    not opened, for opening a pipe waits for a writer forever: None, counted as "missing_file".
    """
    if not isinstance(source, bytes) and not os.path.isfile(source):
        if counter is not None:
            counter.add("missing_file", f"{source} is not a file (a pipe, a device or a dangling symlink?)")
        return None
    image, reasons = decode_rgb_reasons(source, resolution)
    if counter is not None:
        for reason in reasons:
            counter.add(reason, str(source) if not isinstance(source, bytes) else "")
    return image


def clean_caption(value: object) -> str | None:
    """A usable caption: the stripped string, or None if it is not a string or is blank."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def listed_caption(value: object) -> str | None:
    """A metadata caption that may be a list (COCO's layout: an image's five captions in one "text"): a usable string
    (`clean_caption`), or the first usable string of a list. diffusers' train_text_to_image draws one of the list at random
    each time it reads the image, which neither a resumed run nor a latent cache can reproduce; the first is the same at
    every reading. To train on every caption of an image, give it a line (a sample) per caption."""
    if isinstance(value, list):
        return next((caption for caption in map(clean_caption, value) if caption is not None), None)
    return clean_caption(value)


def caption_problem(caption: str) -> str | None:
    """Why a decoded caption is not text to train on, or None: NUL characters, which UTF-16 text without a byte-order
    mark is full of and still decodes as UTF-8."""
    if "\x00" in caption:
        return "holds NUL characters (UTF-16 text?); save the captions as UTF-8"
    return None


def _to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to 8-bit RGB; returns the image and the conversion reason (None if none)."""
    mode = image.mode
    if "transparency" in image.info and mode in _KEYED_MODES:
        return _on_white(_keyed_rgba(image)), "converted_alpha"
    if mode == "RGB":
        return image, None
    if mode in _ALPHA_MODES:
        return _on_white(image.convert("RGBA")), "converted_alpha"
    if mode in _SIXTEEN_BIT_MODES:
        return _scaled_gray(np.asarray(image), 65535, "32-bit integer"), "converted_16bit"
    if mode == "F":
        return _scaled_gray(np.asarray(image), 1.0, "float"), "converted_float"
    reason = {"1": "grayscale", "L": "grayscale", "P": "palette"}.get(mode, mode.lower().replace(";", "_"))
    return image.convert("RGB"), f"converted_{reason}"


def _keyed_rgba(image: Image.Image) -> Image.Image:
    """An image whose transparency is a key (a PNG's tRNS chunk, a GIF's transparent index: one palette entry, gray level
    or RGB colour marks the transparent pixels) as RGBA. PNG optimisers (optipng, oxipng) write a cut-out whose alpha is only
    0 or 255 as RGB with a tRNS colour, which read as RGB kept the colour stored under the transparency (black, typically).
    Pillow's own conversion to RGBA honours the key of a palette, 1-bit, 8-bit gray or RGB image; a 16-bit gray one's it
    drops, clipping the gray at 255, so its alpha is the pixels that differ from the key and its gray is scaled as
    `_scaled_gray` scales it."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image.convert("RGBA")
    values = np.asarray(image)
    rgba = _scaled_gray(values, 65535, "32-bit integer").convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)))
    return rgba


def _on_white(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited on white, as RGB: a transparent background becomes white, not the colour stored under it."""
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scaled_gray(values: np.ndarray, white: float, kind: str) -> Image.Image:
    """Gray `values` on a 0..`white` scale as 8-bit RGB, rounded; `UnknownScale` if a value (NaN included) is off that scale,
    for then the image has another scale that its file does not state ("I" beyond 16 bits, "F" outside [0, 1])."""
    if values.size and not (values.min() >= 0 and values.max() <= white):
        raise UnknownScale(f"a {kind} image with values from {values.min()} to {values.max()}, not 0 to {white:g}: its "
                           "scale is unknown; save it as an 8- or 16-bit image")
    gray = np.rint(values.astype(np.float32) * np.float32(255.0 / white)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The central square of the image at resolution x resolution: the shorter side scaled to `resolution`, the longer
    one cropped evenly, as scaling the whole image and cropping it would give; but only the square is resampled
    (Pillow's `box`), so a long thin image costs no more memory than an ordinary one."""
    scale = resolution / min(image.size)
    box = []
    for length in image.size:  # per side: the whole image scaled to `scaled` pixels, cropped from `start`, in source pixels
        scaled = max(resolution, round(length * scale))
        start = (scaled - resolution) // 2
        box.append((start * length / scaled, min(length, (start + resolution) * length / scaled)))
    (left, right), (top, bottom) = box
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=(left, top, right, bottom))
