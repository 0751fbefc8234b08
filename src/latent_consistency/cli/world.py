"""`lcm world build | export | check | preview-decoder`: make the built-in world, ship it in fp16, measure it, and distil
a tiny preview decoder from its VAE."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from latent_consistency.cli.arguments import nonnegative_int, positive_int, source
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold
from latent_consistency.world.presets import PRESETS, WorldPreset, get_preset


def _preset_from_args(args) -> WorldPreset:
    """The preset with the options' overrides. A --dataset that is one of the preset's pretraining datasets (digits, in every
    preset but `large`) leaves it out of them, with a note: a world's own dataset is never its pretraining data
    (`check_world_spec`), and `large` shows the combination, digits with no pretraining data."""
    preset = get_preset(args.preset)
    overrides = {k: v for k, v in (("dataset", args.dataset), ("resolution", args.resolution), ("seed", args.seed)) if v is not None}
    if args.dataset in preset.pretraining_datasets:
        overrides["pretraining_datasets"] = tuple(name for name in preset.pretraining_datasets if name != args.dataset)
        print(f"note: {args.dataset} is the world's own dataset, so it is left out of the {preset.name} preset's pretraining datasets",
              file=sys.stderr)
    if args.zero_terminal_snr:
        overrides["teacher"] = dataclasses.replace(preset.teacher, zero_terminal_snr=True)
    return dataclasses.replace(preset, **overrides)


def _world_arg(world: str | None) -> str | Path:
    """--world: a folder, or the built-in world when it is left out; an empty name is neither (nor the current folder)."""
    from latent_consistency.world.artifact import default_world_path

    if world is None:
        return default_world_path()
    if not world.strip():
        raise UserError(f"--world {world!r} names no folder; give a world folder")
    return world


def _holding_out(run):
    """`run` holding --out's lock (`folder_lock.hold`), as every command that writes a folder does: two `lcm world build`
    into one folder trained the same phase into the same .work/ folder, one clearing or moving away what the other wrote
    (the second stopped in a traceback, the world left of both); two exports or preview decoders shared one OUT.partial.
    A --dry-run writes nothing, and takes no lock."""
    def holding(args) -> None:
        with hold(None if getattr(args, "dry_run", False) else args.out):
            run(args)

    return holding


def _run_build(args) -> None:
    from latent_consistency.world.build import COMMAND_FLAGS, build_world, check_world_spec, world_spec

    preset = _preset_from_args(args)
    prediction_type = "v_prediction" if args.v_prediction else "epsilon"
    if args.dry_run:
        check_world_spec(preset, prediction_type, COMMAND_FLAGS)
        print(json.dumps(world_spec(preset, prediction_type), indent=2))
        return
    parts_from = args.parts_from
    if parts_from == "default" and not Path(parts_from).exists():
        from latent_consistency.world.artifact import default_world_path

        parts_from = default_world_path()
    if parts_from is not None and args.out.strip():  # an empty --out is refused by `build_world`
        _check_parts_go_in(args.out, parts_from, args.parts_from)
    try:
        out = build_world(preset, args.out, args.device, progress=not args.no_progress, prediction_type=prediction_type,
                          parts_from=parts_from, flags=COMMAND_FLAGS)
    except KeyboardInterrupt as stop:  # its one line (`cli.stopped`) says how to go on
        stop.args = ("(run the same command again to resume the build: finished phases are kept, the stopped one goes on from "
                     "its last checkpoint where it has one)",)
        raise
    report = json.loads((out / "quality" / "quality.json").read_text())
    print(json.dumps(report["summary"], indent=2))
    print(f"world written to {out}")


def _check_parts_go_in(out: str, parts_from: str | Path, given: str) -> None:
    """--parts-from copies phases into a build that has not started (`build_world`): into a started one it was ignored, and the
    phases it names were trained again (an hour for the shipped VAE). Resuming a build that took its parts from that world
    (the same command run again, from any folder: the record holds the world's resolved path) stays accepted; a record
    of an earlier version, the path as it was typed, is read against the current folder as it always was."""
    from latent_consistency.world.build import STATE_FILE, finished_phases

    done = finished_phases(Path(out))
    if not done:
        return
    reused_from = json.loads((Path(out) / STATE_FILE).read_text()).get("reused_from") or {}
    if any(Path(src).resolve() == Path(parts_from).resolve() for src in reused_from.values()):
        return
    raise UserError(f"--parts-from {given}: the build in {out} has started without parts of that world ({', '.join(done)} done), and "
                    "parts are copied only into a build that has not; leave --parts-from out to resume it, or give a new --out")


def _run_export(args) -> None:
    from latent_consistency.world.build import COMMAND_FLAGS, export_world

    print(f"fp16 world written to {export_world(args.src, args.out, flags=COMMAND_FLAGS)}")


def _run_check(args) -> None:
    from latent_consistency.devices import resolve_device
    from latent_consistency.outputs import check_writable
    from latent_consistency.world.artifact import load_world
    from latent_consistency.world.quality import check_samples, measure_quality

    folder, out = Path(_world_arg(args.world)).resolve(), Path(args.out).resolve()
    if out == folder or folder in out.parents:  # quality/ there is the report `lcm world build` wrote: it would be replaced
        where = {folder: "the world folder", folder / "quality": "the quality report folder of"}.get(out, "inside the world folder")
        raise UserError(f"--out {args.out} is {where} --world {args.world}; give a folder outside the world")
    if args.samples is not None:  # known now, not after the world loads
        check_samples(args.samples)
    check_writable(args.out, "--out")  # an empty or unwritable --out, before the world loads (made by measure_quality)
    device = resolve_device(args.device)
    world = load_world(args.world, device)
    config = world.preset.quality if args.samples is None else dataclasses.replace(world.preset.quality, num_samples=args.samples)
    report = measure_quality(world, config, Path(args.out), device, progress=not args.no_progress)
    print(json.dumps(report["summary"], indent=2))


def _run_preview_decoder(args) -> None:
    from latent_consistency.devices import resolve_device
    from latent_consistency.world.preview_decoder import QUALITY_FILE, PreviewDecoderConfig, build_preview_decoder

    overrides = {k: v for k, v in (("steps", args.steps), ("images", args.images), ("channels", args.channels)) if v is not None}
    config = dataclasses.replace(PreviewDecoderConfig(), **overrides)
    world = _world_arg(args.world)
    out = build_preview_decoder(world, args.out, config, resolve_device(args.device), progress=not args.no_progress)
    print(json.dumps(json.loads((out / QUALITY_FILE).read_text())["quality"], indent=2))
    print(f"preview decoder written to {out}; use it with `lcm generate --preview-decoder {out}`")


def register(subparsers) -> None:
    from latent_consistency.world.preview_decoder import MAX_CHANNELS

    world = subparsers.add_parser(
        "world",
        help="build, export or check the built-in toy text-to-image world",
        description="The built-in world: a captioned dataset, a CLIP tokenizer and text encoder, a VAE, a "
        "Stable-Diffusion-architecture teacher (SDXL-architecture with the *-sdxl presets: a second text encoder, pooled "
        "embedding and size micro-conditioning) and an evaluation judge, all trained here.",
    )
    commands = world.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")

    b = commands.add_parser("build", help="train every part of a world into a folder (resumable)")
    b.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: default)")
    b.add_argument("--out", required=True, help="world folder: new, empty, or an unfinished build of the same settings")
    b.add_argument("--dataset", help="override the preset's dataset (shapes or digits; one the preset pretrains on, digits, is left "
                   "out of its pretraining datasets)")
    b.add_argument("--resolution", type=positive_int, help="override the preset's image resolution in px (32 or 64)")
    b.add_argument("--seed", type=nonnegative_int, help="override the preset's seed")
    b.add_argument("--v-prediction", action="store_true", help="train a v-prediction teacher instead of ε-prediction")
    b.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the teacher's noise schedule to zero SNR at t = T-1 (Lin et al. 2023; needs --v-prediction)")
    b.add_argument("--parts-from", metavar="WORLD", type=source,
                   help="copy the first phases from another world (a build, an export or 'default' for the shipped world) "
                        "where the settings they depend on are equal, instead of training them, into a build that has not "
                        "started: e.g. the shipped VAE for default-sdxl")
    b.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--dry-run", action="store_true", help="print the resolved settings and stop")
    b.set_defaults(run=_holding_out(_run_build))

    e = commands.add_parser("export", help="copy a finished world with fp16 weights (for shipping)")
    e.add_argument("--from", dest="src", required=True, help="a finished world folder")
    e.add_argument("--out", required=True, help="new or empty folder for the copy, outside --from (written into OUT.partial first; "
                   "an OUT.partial that is not an unfinished export is refused, not replaced)")
    e.set_defaults(run=_holding_out(_run_export))

    c = commands.add_parser("check", help="measure a world's teacher and VAE against the quality bar")
    c.add_argument("--world", required=True, help="a world folder (a build or an export)")
    c.add_argument("--out", required=True, help="folder for quality.json and teacher_grid.png")
    c.add_argument("--samples", type=positive_int, help="generated images per guidance scale (default: the preset's)")
    c.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(run=_holding_out(_run_check))

    v = commands.add_parser("preview-decoder", help="distil a tiny TAESD-style preview decoder from a world's VAE (resumable)",
                            description="Distil a tiny AutoencoderTiny (TAESD-style) from a world VAE's decoder, for fast approximate "
                            "previews with `lcm generate --preview-decoder DIR`. Writes a diffusers AutoencoderTiny folder with "
                            "preview_quality.json (PSNR against the VAE's decoder on held-out latents) and preview_grid.png.")
    v.add_argument("--world", help="a world folder (default: the built-in world)")
    v.add_argument("--out", required=True, help="new or empty folder for the AutoencoderTiny (an unfinished run resumes from OUT.partial)")
    v.add_argument("--steps", type=positive_int, help="training steps (default 2000)")
    v.add_argument("--images", type=positive_int, help="training images encoded once, as many perturbed latents again (default 2048)")
    v.add_argument("--channels", type=positive_int, help="the tiny decoder's width (default 16; 32 decodes about 3x slower, closer "
                   f"to the VAE; at most {MAX_CHANNELS})")
    v.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    v.add_argument("--no-progress", action="store_true", help="no progress bars")
    v.set_defaults(run=_holding_out(_run_preview_decoder))
