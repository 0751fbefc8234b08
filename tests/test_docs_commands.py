"""Every `lcm ...` command line that README.md and docs/*.md show is one the current command line accepts.

The commands are read from the fenced code blocks (a line that starts with `lcm`, or runs it through `accelerate launch
-m latent_consistency.cli` or `"$(which lcm)"`; `\\` continues a line; `for VAR in A B C; do` loops are expanded) and from
inline code spans that start with `lcm COMMAND --flag`. Each is parsed by `lcm`'s own argparse parser, nothing is run:

- placeholders (`...`, `DIR`, `NAME`, `N`, `<folder>`, `$RUN`) become a dummy value of the flag they follow (its first
  choice, `1` for a number, else a path); a `...` that stands for other flags is dropped;
- an inline span is a fragment: it may leave out the flags a command requires, and a flag it names last may lack its value;
- every `--flag`, in the command and in a comment after it on the same line, is one the command has (not one it refuses);
- every `--preset` and `--world-preset` names a preset that exists;
- an `lcm distill` / `lcm finetune` command also resolves to a training config that `check()` accepts, as `--dry-run`
  would print it (where a `...` stands for other flags, or in an inline fragment, with a dummy model, data and out).

docs/notes/ is a dated log, not instructions, and is not checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here reads the hub; if anything tried, it must fail at once

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *(f"docs/{name}.md" for name in ("guide", "scale", "world", "benchmarks", "paper", "known-answer"))]
DUMMY_PATH = "placeholder/path"

# Where the command line starts: `lcm`, `... -m latent_consistency.cli`, `... "$(which lcm)"`.
LAUNCHER = re.compile(r'(?:^|\s)(?:lcm|-m\s+latent_consistency\.cli|"\$\(which lcm\)")\s+(?=[a-z])')
PLACEHOLDER = re.compile(r"^(?:\.\.\.|[A-Z][A-Z0-9_]*|<[^>]+>|.*\$.*)$")
FLAG = re.compile(r"--[a-z][a-z0-9-]*")


@dataclasses.dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    text: str  # the command as written, continuations joined, from `lcm` (or the launcher) on
    comment: str  # the comment after it on the same line, if any
    inline: bool  # an inline code span: a fragment
    loops: tuple[tuple[str, tuple[str, ...]], ...] = ()  # shell `for` variables of the block around it

    def argv_variants(self) -> list[list[str]]:
        """The argv after `lcm`, once per combination of the loop variables it uses."""
        used = [(name, values) for name, values in self.loops if re.search(rf"\${{?{name}\b", self.text)]
        variants = []
        for combo in itertools.product(*(values for _, values in used)) if used else [()]:
            text = self.text
            for (name, _), value in zip(used, combo):
                text = re.sub(rf"\$\{{{name}\}}|\${name}\b", value, text)
            variants.append(shlex.split(LAUNCHER.split(text, maxsplit=1)[1]))
        return variants

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _split_comment(line: str) -> tuple[str, str]:
    """`line` before and after its first unquoted ` #`."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Each fenced (```) block of a Markdown text: its language ("" for none), the index of its first line, its lines."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        blocks.append((fence.group(1), i + 1, lines[i + 1:end]))
        i = end + 1
    return blocks


def _block_commands(file: str, text: str) -> list[DocCommand]:
    commands = []
    for lang, start, block in fenced_blocks(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        loops = tuple((name, tuple(values.split())) for name, values in re.findall(r"\bfor\s+(\w+)\s+in\s+([^;]+);\s*do\b", "\n".join(block)))
        j = 0
        while j < len(block):
            first, logical = j, block[j]
            while logical.rstrip().endswith("\\") and j + 1 < len(block):
                j += 1
                logical = logical.rstrip()[:-1] + " " + block[j].strip()
            j += 1
            code, comment = _split_comment(logical.strip())
            head = code.split(maxsplit=1)[0] if code else ""
            if head not in ("lcm", "accelerate", "python", "python3", "torchrun") or not LAUNCHER.search(code):
                continue
            commands.append(DocCommand(file, start + first + 1, code, comment, inline=False, loops=loops))
    return commands


def _inline_spans(file: str, text: str) -> list[tuple[int, str]]:
    """(line, content) of every inline code span outside fenced blocks; a span may run over a line break."""
    blanked = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    return [(blanked.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", blanked)]


def _inline_commands(file: str, text: str) -> tuple[list[DocCommand], list[DocCommand]]:
    """Inline spans that are commands with flags, and those that only name a command (`lcm serve`, `lcm distill --help`)."""
    with_flags, named = [], []
    for line, span in _inline_spans(file, text):
        if not (span.startswith("lcm ") or (span.split()[0] in ("accelerate", "torchrun") and LAUNCHER.search(span))):
            continue
        command = DocCommand(file, line, span, "", inline=True)
        flags = [t for t in shlex.split(LAUNCHER.split(span, maxsplit=1)[1]) if t.startswith("-") and t != "--help"]
        (with_flags if flags else named).append(command)
    return with_flags, named


def _collect():
    blocks, inline, named = [], [], []
    for file in DOCS:
        text = (ROOT / file).read_text()
        blocks += _block_commands(file, text)
        with_flags, names = _inline_commands(file, text)
        inline += with_flags
        named += names
    return blocks, inline, named


BLOCK_COMMANDS, INLINE_COMMANDS, NAMED_COMMANDS = _collect()


def _ids(commands: list[DocCommand]) -> list[str]:
    ids, seen = [], {}
    for c in commands:
        seen[c.id] = seen.get(c.id, 0) + 1
        ids.append(c.id if seen[c.id] == 1 else f"{c.id}#{seen[c.id]}")
    return ids


# --- the parser ------------------------------------------------------------------------------------------------------

def _subparsers_action(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _all_parsers(parser):
    yield parser
    sub = _subparsers_action(parser)
    if sub is not None:
        for child in dict.fromkeys(sub.choices.values()):
            yield from _all_parsers(child)


@pytest.fixture(scope="module")
def parsers():
    """`lcm`'s parser, and a lenient twin for fragments in which no flag is required."""
    from latent_consistency.cli import build_parser

    strict, lenient = build_parser(), build_parser()
    for p in _all_parsers(lenient):
        for action in p._actions:
            if action.option_strings:
                action.required = False
    return strict, lenient


def _command_path(parser, argv: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The (sub)command names at the head of `argv`, and the parser of the last one."""
    path = []
    while (sub := _subparsers_action(parser)) is not None and len(path) < len(argv) \
            and not argv[len(path)].startswith("-") and argv[len(path)] != "...":
        name = argv[len(path)]
        if name not in sub.choices:
            pytest.fail(f"`lcm {' '.join(path + [name])}` is no command; `lcm {' '.join(path)}` has {', '.join(sub.choices)}")
        path.append(name)
        parser = sub.choices[name]
    return path, parser


def _options(parser) -> dict[str, argparse.Action]:
    """A parser's flags, without the ones it only has to refuse (another command's)."""
    return {s: a for a in parser._actions if a.help is not argparse.SUPPRESS or isinstance(a, argparse._HelpAction)
            for s in a.option_strings}


def _dummy(action: argparse.Action | None) -> str:
    if action is not None and action.choices:
        return str(next(iter(action.choices)))
    if action is None or action.type in (None, str):
        return DUMMY_PATH
    try:
        action.type("1")
        return "1"
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return DUMMY_PATH


def _takes_value(action: argparse.Action | None) -> bool:
    return action is not None and action.nargs != 0


def _fill(argv: list[str], parser, start: int, fragment: bool) -> tuple[list[str], bool]:
    """`argv` with placeholders made dummy values, and whether a `...` was dropped (it stood for other flags)."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    out, dropped, current = list(argv[:start]), False, None
    for token in argv[start:]:
        if token.startswith("--"):
            if fragment and _takes_value(current) and out[-1].startswith("--") and current.nargs not in ("?", "*"):
                out.append(_dummy(current))  # a fragment's flag named for itself: `lcm evaluate --guided-distill`
            current = options.get(token.split("=", 1)[0])
            out.append(token)
            if "=" in token or not _takes_value(current):
                current = None
            continue
        if PLACEHOLDER.match(token):
            if _takes_value(current):
                out.append(_dummy(current))
            elif token == "...":
                dropped = True
            else:
                out.append(DUMMY_PATH)
        else:
            out.append(token)
        if current is not None and current.nargs in (None, "?"):
            current = None
    if fragment and _takes_value(current) and out[-1].startswith("--") and current.nargs not in ("?", "*"):
        out.append(_dummy(current))
    return out, dropped


def _parse(parser, argv: list[str], capsys) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        err = capsys.readouterr().err.strip()
        pytest.fail(f"`lcm {shlex.join(argv)}` exits {stop.code}: {err}")


def _check_presets(path: list[str], args: argparse.Namespace) -> None:
    from latent_consistency.training.config import PRESETS, DistillConfig, FinetuneConfig
    from latent_consistency.world.presets import PRESETS as WORLD_PRESETS

    known = {("distill", "preset"): PRESETS[DistillConfig], ("finetune", "preset"): PRESETS[FinetuneConfig],
             ("world", "build", "preset"): WORLD_PRESETS, ("demo", "world_preset"): WORLD_PRESETS}
    for key, presets in known.items():
        if tuple(path) == key[:-1]:
            name = getattr(args, key[-1])
            if not (name is None or name == DUMMY_PATH or name in presets):
                pytest.fail(f"--{key[-1].replace('_', '-')} {name} is no preset of `lcm {' '.join(path)}`: {', '.join(presets)}")


def _check_training_config(path: list[str], args: argparse.Namespace, elided: bool, argv: list[str]) -> None:
    """A distill or finetune command resolves to a config that `check()` accepts (as `--dry-run` checks it); where a `...`
    stands for other flags, the model, data and out folder it leaves out are dummies."""
    from latent_consistency.training.config import DistillConfig, FinetuneConfig, resolve_config

    cls = {"distill": DistillConfig, "finetune": FinetuneConfig}[path[0]]
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    for name in (cls.model_field, "data", "out") if elided else ():
        overrides[name] = overrides[name] or f"{DUMMY_PATH}-{name}"
    from latent_consistency.errors import UserError

    try:
        resolve_config(cls, args.preset, args.config, overrides).check()
    except UserError as err:
        pytest.fail(f"`lcm {shlex.join(argv)}` resolves to a config that is refused: {err}")


def _check(command: DocCommand, parsers, capsys) -> None:
    strict, lenient = parsers
    parser = lenient if command.inline else strict
    for argv in command.argv_variants():
        path, sub = _command_path(parser, argv)
        if not path:
            pytest.fail(f"`{command.text}` names no command")
        options = _options(sub)
        for flag in [t.split("=", 1)[0] for t in argv[len(path):] if t.startswith("--")] + FLAG.findall(command.comment):
            if flag not in options:
                pytest.fail(f"`lcm {' '.join(path)}` has no flag {flag} (in `{command.text}`)")
        filled, dropped = _fill(argv, sub, len(path), command.inline)
        args = _parse(parser, filled, capsys)
        _check_presets(path, args)
        if path[0] in ("distill", "finetune") and not args.config:
            _check_training_config(path, args, elided=dropped or command.inline, argv=filled)


@pytest.mark.parametrize("command", BLOCK_COMMANDS, ids=_ids(BLOCK_COMMANDS))
def test_documented_command(command, parsers, capsys):
    _check(command, parsers, capsys)


@pytest.mark.parametrize("command", INLINE_COMMANDS, ids=_ids(INLINE_COMMANDS))
def test_documented_inline_command(command, parsers, capsys):
    _check(command, parsers, capsys)


@pytest.mark.parametrize("file", DOCS)
def test_named_commands_exist(file, parsers):
    """`lcm serve`, `lcm world preview-decoder`, `lcm evaluate sweep`, `lcm distill --help` in the prose are commands."""
    strict, _ = parsers
    for command in (c for c in NAMED_COMMANDS if c.file == file):
        argv = [t for t in shlex.split(LAUNCHER.split(command.text, maxsplit=1)[1]) if t not in ("...", "--help")]
        _command_path(strict, argv)


def test_the_docs_show_commands():
    """The extraction finds what the docs hold (a regex that finds nothing would pass every command)."""
    files = {c.file for c in BLOCK_COMMANDS}
    assert {"README.md", "docs/guide.md", "docs/world.md", "docs/paper.md", "docs/scale.md"} <= files
    assert len(BLOCK_COMMANDS) >= 50 and len(INLINE_COMMANDS) >= 10
