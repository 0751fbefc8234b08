"""Images out: tensors in [-1, 1] to PIL images, labelled sample grids, atomic PNG writes."""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from PIL.PngImagePlugin import PngInfo

from latent_consistency import fonts
from latent_consistency.errors import UserError
from latent_consistency.outputs import write_atomic

CHAR_WIDTH, LINE_HEIGHT = 6, 11  # px of PIL's bitmap font (`draw_line`)
FONT_SIZE = 9  # px of the FreeType fonts for text the bitmap font lacks: a line in LINE_HEIGHT, a letter in CHAR_WIDTH


def draw_line(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """Draw one line of `text` at `xy`: in PIL's built-in bitmap font, every character `CHAR_WIDTH` px wide as the
    wrapping counts, when the text is Latin-1; otherwise run by run in the installed fonts that have its characters
    (`fonts.runs`: "猫が座っている" in a CJK font where one is installed, "кот" and "ω" in DejaVu Sans, which matplotlib
    ships). PIL's default FreeType font (Pillow 10.1+) has Latin only: everything else came out as boxes. Without
    FreeType, what Latin-1 lacks is drawn as "?"."""
    latin1 = text.encode("latin-1", "replace").decode("latin-1")
    if latin1 == text or not features.check("freetype2"):
        draw.text(xy, latin1, fill="black", font=_bitmap_font())
        return
    x, y = xy
    for part, path in fonts.runs(text):
        font = _truetype(path) or _truetype(fonts.font_for("A")[1])
        draw.text((x, y), part, fill="black", font=font)
        x += round(font.getlength(part))


def text_units(text: str) -> int:
    """Width of `text` in `CHAR_WIDTH` units: 2 for a wide character (CJK, emoji: East Asian width W or F), 1 else."""
    return sum(2 if _wide(c) else 1 for c in text)


@functools.cache
def _bitmap_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font, loaded once (`load_default` is the bitmap one before Pillow 10.1)."""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


@functools.cache
def _truetype(path: str | None) -> ImageFont.FreeTypeFont | None:
    """The font file at `path` at `FONT_SIZE`, loaded once; None for no file or one FreeType cannot scale to that
    size (a bitmap-only font such as Noto Color Emoji)."""
    try:
        return ImageFont.truetype(path, FONT_SIZE) if path else None
    except OSError:
        return None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], [B,3,H,W] -> 8-bit RGB PIL images. What is no such batch is a UserError, not a picture of it:
    a tensor of other dimensions (one image [3, H, W]: `images[None]`) or channels (latents: decode them first), integer
    pixels, and images with NaN or infinite pixels, which would come out black."""
    if not isinstance(images, torch.Tensor):
        raise UserError(f"images must be a tensor [B, 3, H, W] in [-1, 1], got a {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        hint = ("one image [3, H, W] is images[None]" if images.ndim == 3 and images.shape[0] == 3 else
                "latents are decoded first: model.codec.decode(latents)" if images.ndim == 4 and images.shape[1] != 3 else
                "pixels p in [0, 255] are p / 127.5 - 1" if images.ndim == 4 else "give a batch of RGB images")
        raise UserError(f"images must be a floating-point tensor [B, 3, H, W] in [-1, 1], got {list(images.shape)} {images.dtype}; {hint}")
    bad = [i for i, ok in enumerate(torch.isfinite(images).flatten(1).all(dim=1).tolist()) if not ok]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UserError(f"image(s) {shown} of the {len(images)} hold NaN or infinite pixels, which would come out black: the model's "
                        "weights may hold NaN (a diverged run), or half precision overflowed (sample in float32)")
    return _rgb8(images)


def _rgb8(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1, 1] -> 8-bit RGB PIL images, unchecked: a grid (`image_grid`) shows a diverged run's NaN images as
    they are (black) beside the others, where `to_pil` refuses them."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write atomically (`write_atomic`: whole or not at all, even when interrupted, and a full disk names the file).
    `text`: UTF-8 text chunks to write in the PNG, {keyword: text}."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def wrap_caption(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` units (`text_units`: a CJK character or an emoji is two), broken between
    words; a word longer than a line is broken with a hyphen ("handwritt-", "en"), not silently ("handwrit", "ten"
    read as two words), and between any two characters without one where either is wide, as CJK text breaks."""
    pieces: list[tuple[str, bool]] = []  # (piece, whether the next piece continues its word)
    for word in text.split():
        while text_units(word) > width > 1:
            head, word = _break_word(word, width)
            pieces.append((head, True))
        pieces.append((word, False))
    lines: list[str] = []
    continued = False
    for piece, continues in pieces:
        if lines and not continued and text_units(lines[-1]) + 1 + text_units(piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
        continued = continues
    return lines


def _break_word(word: str, width: int) -> tuple[str, str]:
    """The first line's part of a word wider than `width` units, and the rest: a hyphenated head of `width` − 1
    units, or, where the break falls beside a wide character, a head of `width` units without a hyphen. At least one
    character, so that every call shortens the word."""
    n = _fitting(word, width)
    if _wide(word[n - 1]) or _wide(word[n]):
        return word[:n], word[n:]
    n = _fitting(word, width - 1)
    return word[:n] + "-", word[n:]


def _fitting(word: str, width: int) -> int:
    """How many of `word`'s first characters fit in `width` units (at least one)."""
    n, used = 0, 0
    while n < len(word) and used + text_units(word[n]) <= width:
        used += text_units(word[n])
        n += 1
    return max(n, 1)


def _wide(char: str) -> bool:
    """A character two units wide (East Asian width W or F: CJK, most emoji)."""
    return unicodedata.east_asian_width(char) in "WF"


MAX_CAPTION_LINES = 6  # a caption of a paragraph (a data caption) would make the grid a column of text over a strip of images


def _at_most(lines: list[str], n: int) -> list[str]:
    """The first `n` lines, the last ending in "..." when lines were left out."""
    return lines if len(lines) <= n else lines[: n - 1] + [lines[n - 1].rstrip("-") + "..."]


def image_grid(rows: list[torch.Tensor], row_labels: list[str], scale: int = 2, label_width: int = 90,
               column_labels: list[str] | None = None) -> Image.Image:
    """A grid with one row per tensor [B,3,H,W] (same B, H, W), a text label left of each row and, when given, a
    caption above each column (wrapped to the column's width). `label_width`: px left of the images, widened to the
    longest row label."""
    label_width = max(label_width, CHAR_WIDTH * max(map(text_units, row_labels), default=0) + 8)  # a label never runs under an image
    tiles = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in _rgb8(r)] for r in rows]
    h, w = tiles[0][0].height, tiles[0][0].width
    # a line ends 2 px short of the next column at least (it starts 2 px into its own): no two columns' words run together
    captions = [_at_most(wrap_caption(text, max(1, (w - 4) // CHAR_WIDTH)), MAX_CAPTION_LINES) for text in column_labels or []]
    top = LINE_HEIGHT * max((len(c) for c in captions), default=0) + (4 if captions else 0)
    grid = Image.new("RGB", (label_width + w * len(tiles[0]), top + h * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(captions):
        for k, line in enumerate(lines):
            draw_line(draw, (label_width + j * w + 2, 2 + k * LINE_HEIGHT), line)
    for i, (row, label) in enumerate(zip(tiles, row_labels)):
        draw_line(draw, (4, top + i * h + h // 2 - 5), label)
        for j, tile in enumerate(row):
            grid.paste(tile, (label_width + j * w, top + i * h))
    return grid
