"""Images out: tensors in [-1, 1] to PIL images, labelled sample grids, atomic PNG writes."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from latent_consistency.outputs import write_atomic

CHAR_WIDTH, LINE_HEIGHT = 6, 11  # px of PIL's bitmap font (`drawable`)


def drawable(text: str) -> tuple[str, ImageFont.ImageFont | ImageFont.FreeTypeFont]:
    """`text` and the font to draw it in: PIL's built-in bitmap font, every character `CHAR_WIDTH` px wide as the
    wrapping counts, for text it has (Latin-1). Pillow 10.1 made a FreeType font the default where FreeType is
    installed, whose space after a "t" is a pixel wide ("digit six" read "digitsix" in the digits grid); it draws the
    rest ("a ☕ on a table"), narrower than the bitmap font. Without FreeType, what Latin-1 lacks is drawn as "?"."""
    try:
        text.encode("latin-1")
        return text, _bitmap_font()
    except UnicodeEncodeError:
        font = _default_font()
        if isinstance(font, ImageFont.FreeTypeFont):
            return text, font
        return text.encode("latin-1", "replace").decode("latin-1"), font


@functools.cache
def _bitmap_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font, loaded once (`load_default` is the bitmap one before Pillow 10.1)."""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


@functools.cache
def _default_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font (FreeType's where installed, from Pillow 10.1), loaded once."""
    return ImageFont.load_default()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1], [B,3,H,W] -> 8-bit RGB PIL images."""
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
    """`text` in lines of at most `width` characters, broken between words; a word longer than a line is broken with a
    hyphen ("handwritt-", "en"), not silently ("handwrit", "ten" read as two words)."""
    words = []
    for word in text.split():
        while len(word) > width > 1:
            words.append(word[: width - 1] + "-")
            word = word[width - 1 :]
        words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and not lines[-1].endswith("-") and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


MAX_CAPTION_LINES = 6  # a caption of a paragraph (a data caption) would make the grid a column of text over a strip of images


def _at_most(lines: list[str], n: int) -> list[str]:
    """The first `n` lines, the last ending in "..." when lines were left out."""
    return lines if len(lines) <= n else lines[: n - 1] + [lines[n - 1].rstrip("-") + "..."]


def image_grid(rows: list[torch.Tensor], row_labels: list[str], scale: int = 2, label_width: int = 90,
               column_labels: list[str] | None = None) -> Image.Image:
    """A grid with one row per tensor [B,3,H,W] (same B, H, W), a text label left of each row and, when given, a
    caption above each column (wrapped to the column's width). `label_width`: px left of the images, widened to the
    longest row label."""
    label_width = max(label_width, CHAR_WIDTH * max(map(len, row_labels), default=0) + 8)  # a label never runs under an image
    tiles = [[im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in to_pil(r)] for r in rows]
    h, w = tiles[0][0].height, tiles[0][0].width
    # a line ends 2 px short of the next column at least (it starts 2 px into its own): no two columns' words run together
    captions = [_at_most(wrap_caption(text, max(1, (w - 4) // CHAR_WIDTH)), MAX_CAPTION_LINES) for text in column_labels or []]
    top = LINE_HEIGHT * max((len(c) for c in captions), default=0) + (4 if captions else 0)
    grid = Image.new("RGB", (label_width + w * len(tiles[0]), top + h * len(tiles)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lines in enumerate(captions):
        for k, line in enumerate(lines):
            line, font = drawable(line)
            draw.text((label_width + j * w + 2, 2 + k * LINE_HEIGHT), line, fill="black", font=font)
    for i, (row, label) in enumerate(zip(tiles, row_labels)):
        label, font = drawable(label)
        draw.text((4, top + i * h + h // 2 - 5), label, fill="black", font=font)
        for j, tile in enumerate(row):
            grid.paste(tile, (label_width + j * w, top + i * h))
    return grid
