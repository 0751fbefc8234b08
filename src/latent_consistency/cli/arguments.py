"""Argument types shared by the commands: a bad value is one line on stderr and exit code 2.

argparse reports a type error as "argument --NAME: MESSAGE"; `OneLineParser` prints that single line
(no usage block) and exits 2, as every other mistake a user can make does.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

# A command-line word that is a value, never an option, though it starts with "-": a number of any spelling Python reads
# (-1e-4, -.5, -inf, -nan) and a list of them (--timesteps -3,999). No option of `lcm` starts with "-" and a digit.
NEGATIVE_VALUE = re.compile(r"^-(\.?\d|(inf|infinity|nan)$)", re.IGNORECASE)
# The arguments that are text, not a path: their "~" is the user's (`OneLineParser.expand_home`). Generate's positional
# prompts are by their dest with no option string; evaluate's --prompts is a file or dataset spec, a path.
TEXT_DESTS = {"prompt", "negative_prompt", "validation_prompts"}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: what is wrong, and where to look.

    Options are not matched by prefix (argparse's default, here off in every command): `lcm distill --ema 0.9` set
    --ema-decay, and `lcm generate --prompt TEXT` read TEXT as a prompt file before --prompt existed.

    A negative value is the value of its flag however it is spelled (`NEGATIVE_VALUE`): argparse takes only -5 and -0.5
    for numbers, and read `--lr -1e-4`, `--timesteps -3,999` or `--lr -inf` as a flag without its value ("expected one
    argument"), where `--lr=-1e-4` reached the flag's own check ("lr must be positive"). Subcommands' parsers are made of
    this class too (`add_subparsers`), so the one matcher serves every command."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE  # argparse's own test of "a negative number, not an option"

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        self.expand_home(namespace)
        return namespace, extras

    def expand_home(self, namespace: argparse.Namespace) -> None:
        """A path given as `~/...` (or `~user/...`) is the home folder's, in every flag, as the shell expands it unquoted and
        `--data` read it already: quoted, `--out "~/run"` wrote into a folder named "~" under the current one (which a
        later `rm -rf ~` meant to remove it takes the home folder with) and `--model "~/lcm"` did not exist. Prompts and
        other text (`TEXT_DESTS`) are left as typed."""
        for action in self._actions:
            if action.dest in TEXT_DESTS or (action.dest == "prompts" and not action.option_strings):
                continue
            value = getattr(namespace, action.dest, None)
            if isinstance(value, str) and value.startswith("~"):
                setattr(namespace, action.dest, os.path.expanduser(value))
            elif isinstance(value, list) and any(isinstance(v, str) and v.startswith("~") for v in value):
                setattr(namespace, action.dest, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def source(text: str) -> str:
    """A folder, file or hub id to read (a model, a LoRA, a preview decoder, an init image): not blank, which every loader
    took as the current folder (an unset shell variable in `--lora "$LORA"` loaded whatever was there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give a path or a hub id")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def note_truncated_prompts(command: str, model, prompts: list[str]) -> None:
    """One line on stderr (`lcm COMMAND: note: ...`) for prompts longer than `model`'s text encoder reads: their end is
    dropped, as diffusers drops it."""
    from latent_consistency.prompts import truncated_prompts

    long = truncated_prompts(model.prompts, prompts)
    if long:
        i, count, limit = long[0]
        more = f" (so is that of {len(long) - 1} more prompt(s))" if len(long) > 1 else ""
        print(f"lcm {command}: note: prompt {i + 1} is {count} tokens, more than the {limit} the text encoder reads: its end is "
              f"dropped{more}; shorten it to use all of it", file=sys.stderr)
