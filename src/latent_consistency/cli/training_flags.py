"""What `lcm distill` and `lcm finetune` share: one flag per config field, presets, --config FILE, --resume and
--dry-run, and a one-line refusal of the other command's flags.

The config is resolved as preset <- --config FILE <- flags, printed by --dry-run, and handed to the training loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from latent_consistency.cli.arguments import source
from latent_consistency.training.config import (
    COMMANDS,
    CONFIGS,
    PRESETS,
    TrainConfig,
    field_help,
    flag_of,
    preset_adapter_note,
    resolve_config,
    resolved_defaults,
)

# The fields whose empty value means "none" (the default): given blank on the command line, an unset shell variable
# (`--student-init "$INIT"`) started from the teacher, with no held-out data or LoRA, without a word
BLANK_REFUSED = {"student_init", "eval_data", "lora"}


def _flag_type(annotation: str):
    if "bool" in annotation:
        return "bool"
    if "list" in annotation:
        return "list"
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return str


class _Refuse(argparse.Action):
    """A flag of the other command: a one-line error saying where it belongs."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {self.reason}")


def add_training_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig], refused: dict[str, str]) -> None:
    """Preset, --config, --resume, --dry-run, then one flag per config field (default None, so that an unset flag does
    not override the preset or file). Each flag of `refused` (and every field of the other command) is refused."""
    parser.add_argument("--preset", choices=sorted(PRESETS[cls]), help="named starting config: " + ", ".join(sorted(PRESETS[cls])))
    parser.add_argument("--config", type=source, help="JSON file of config fields, applied over the preset")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest complete checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(cls)
    help_texts = field_help(cls)
    group = parser.add_argument_group("training configuration (defaults: the preset, then --config FILE)")
    for f in dataclasses.fields(cls):
        kind = _flag_type(str(hints[f.name]))
        name = flag_of(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{help_texts[f.name]} (default: {default!r})"
        if kind == "bool":
            group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "list":
            group.add_argument(name, dest=f.name, nargs="*", default=None, help=help_text)
        else:  # a blank source (an unset shell variable) is refused, not taken as one left out
            group.add_argument(name, dest=f.name, type=source if f.name in BLANK_REFUSED else kind, default=None, help=help_text)
    booleans = set()
    for other in CONFIGS.values():
        if other is cls:
            continue
        booleans |= {name for name, hint in typing.get_type_hints(other).items() if hint is bool}
        why = ": fine-tuning has no teacher" if other.objective == "lcd" else f", not {COMMANDS[cls]}"
        for f in dataclasses.fields(other):
            if f.name not in help_texts:
                refused.setdefault(f.name, f"belongs to {COMMANDS[other]}{why}")
    for field_name, reason in refused.items():
        flag = flag_of(field_name)
        parser.add_argument(flag, *([f"--no-{field_name.replace('_', '-')}"] if field_name in booleans else []),
                            dest=f"refused_{field_name}", action=_Refuse, reason=reason)


def run_training(args, cls: type[TrainConfig]) -> None:
    from accelerate.utils.environment import get_cpu_distributed_information

    from latent_consistency.training.loop import holding_out, machine_problem, on_every_launched_process, train
    from latent_consistency.training.run_folder import check_run_folder, check_sources_exist, continued_by

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    # Under a launcher every process resolves and checks the config alike: a refusal is said once (`on_every_process`)
    config = on_every_launched_process(lambda: resolve_config(cls, args.preset, args.config, overrides).check())
    if args.dry_run:  # refused as the run would be, writing nothing
        check_run_folder(config, args.resume)
        check_sources_exist(config)
    note = preset_adapter_note(cls, args.preset, config)  # after the refusals: a note is for a run that goes on
    if note is not None and get_cpu_distributed_information().rank == 0:  # said once under a launcher
        print(f"{COMMANDS[cls]}: note: {note}", file=sys.stderr)
    if args.dry_run:  # the config as it would run; one that only another machine can run is printed with a note
        print(json.dumps(config.to_dict(), indent=1))
        resolved = resolved_defaults(config)  # the sentinels the printed config keeps, so that fed back it is the same run
        if resolved:
            print(f"{COMMANDS[cls]}: the run resolves {'; '.join(resolved)}", file=sys.stderr)
        problem = machine_problem(config)
        if problem is not None:
            print(f"note: not on this machine: {problem}", file=sys.stderr)
        return
    # A second run, or --resume, on this folder is refused while this one writes it (under a launcher, on every process at
    # once); a stop says how to go on from where it was
    with holding_out(config), continued_by("to continue, run the same command with --resume",
                                           restart="to start it again, run the same command with --resume"):
        path = train(config, resume=args.resume)
    if path is not None:
        print(f"exported {path}")
