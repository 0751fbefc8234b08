"""Fonts for text of any script in grids and plots: per-character fallback over the fonts this machine has.

PIL draws a whole string in one font and matplotlib's default (DejaVu Sans) has no CJK or emoji, so a caption
"猫が座っている" came out as boxes. The fonts to fall back on are the ones matplotlib's font manager lists: the system's
and matplotlib's own DejaVu, which ships with matplotlib and so is always there (Latin, Greek, Cyrillic, many
symbols). A script that no installed font has still draws as boxes; installing a font for it (e.g. Noto CJK) is
enough, nothing to configure.
"""

from __future__ import annotations

import contextlib
import functools

PRIMARY = "DejaVu Sans"


@functools.cache
def _installed() -> tuple[tuple[str, str], ...]:
    """(family name, file) of every font matplotlib finds, DejaVu Sans first, then by name, matplotlib's "Last Resort"
    (a box naming the character's Unicode block, for any character) last, and in a family its upright regular face
    first: a fixed order, so the same text picks the same fonts on every call. Fonts installed since matplotlib cached
    its list are added to it (for plots too), so installing a font is enough."""
    from matplotlib import font_manager

    known = {f.fname for f in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts():
        if path not in known:
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # a file FreeType cannot read is no font
                font_manager.fontManager.addfont(path)

    def rank(f):  # within a family the upright regular face first
        return (f.name != PRIMARY, f.name.startswith("Last Resort"), f.name, f.style != "normal",
                font_manager.weight_dict.get(f.weight, f.weight) != 400, f.stretch != "normal", f.fname)

    fonts = [f for f in font_manager.fontManager.ttflist if f.fname.lower().endswith((".ttf", ".otf", ".ttc"))]
    return tuple((f.name, f.fname) for f in sorted(fonts, key=rank))


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    """The code points the font file at `path` has a glyph for (empty when FreeType cannot read it)."""
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


def font_for(char: str) -> tuple[str, str] | None:
    """(family, file) of the first installed font (`_installed`'s order) with a glyph for `char`; None when none has."""
    return next(((name, path) for name, path in _installed() if ord(char) in _charmap(path)), None)


def families_for(texts: list[str]) -> list[str]:
    """matplotlib's `font.family` list for `texts`: DejaVu Sans, then, in order of first need, a family for each
    character it lacks. matplotlib (3.6+) falls back along the list per glyph."""
    families = [PRIMARY]
    for char in dict.fromkeys("".join(texts)):
        if not char.isspace() and ord(char) > 0x7F:
            found = font_for(char)
            if found and found[0] not in families:
                families.append(found[0])
    return families


def runs(text: str) -> list[tuple[str, str | None]]:
    """`text` cut into runs of characters that one font draws: [(run, font file or None)], None where no installed
    font has the glyph (it draws in the primary font, as a box). Spaces join the run they are in."""
    out: list[tuple[str, str | None]] = []
    for char in text:
        found = None if char.isspace() else font_for(char)
        path = found[1] if found else (out[-1][1] if out and char.isspace() else None)
        if out and out[-1][1] == path:
            out[-1] = (out[-1][0] + char, path)
        else:
            out.append((char, path))
    return out


def for_texts(texts: list[str]):
    """A context in which matplotlib draws `texts` (legend labels, titles) with `families_for`'s fallback; nothing
    changes for text DejaVu Sans has."""
    families = families_for(list(texts))
    if families == [PRIMARY]:
        return contextlib.nullcontext()
    import matplotlib

    return matplotlib.rc_context({"font.family": families})
