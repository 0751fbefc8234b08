"""The words of a command that a message, a model card or a note prints for the user to paste: each value given to its flag
as argparse reads it back."""

from __future__ import annotations


def flag_words(flag: str, value: str) -> list[str]:
    """The command-line words that give `value` to `flag` as argparse reads them back: `--data=-c1` for a value that starts
    with "-", which after a space argparse takes for a flag ("--data: expected one argument"), else `--data VALUE`. For the
    commands a message or card prints, to be pasted (`shlex.join` quotes each word)."""
    return [f"{flag}={value}"] if value.startswith("-") else [flag, value]
