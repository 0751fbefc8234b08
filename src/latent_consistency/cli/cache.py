"""`lcm cache`: a folder of captioned images, webdataset shards or a registered dataset encoded once into a latent cache, the paper's
D_z = {E(x)} (Section 4.3): the VAE's latents at the model's native size (or --resolution's) and each distinct caption's
text embedding, so that `lcm distill` and `lcm finetune` with `--data CACHE` run no VAE or text encoder in their steps.

The cache is written with the model the runs train (the teacher for `distill`, the LCM for `finetune`), of which only the
VAE and text encoder(s) load (its UNet's or transformer's config gives the native size and the width the text encoders
must make; its weights, 3.4 GB in SD 1.5 and 10 GB in SDXL, are not read), and records a digest of its VAE and text
encoder(s): a run whose model has another VAE or text encoder is refused, and any model that shares them (an LCM
distilled from the teacher, a fine-tune that kept them) trains on the same cache. Its images are read as a run reads
them (`--data` of the same folder, and the same --resolution): upright, 8-bit RGB, the shorter side scaled to the
model's native size (or --resolution's) and the central square kept. A cache at another size than the native one (SDXL
at 512 px, say: the cheap way to train on much data at a smaller size) is trained on with that --resolution: its SDXL
conditions carry that size as their micro-conditioning, as a run's at that size do. Each usable sample is written once
(`data.latent_cache.UsableBatches`): a corrupt image or a sample without a caption is counted and left out, and shards
are read once each, shard after shard; data without a usable sample is refused with one line, leaving no OUT.partial.
Captions longer than the text encoder reads are cut, as diffusers cuts them, with a note saying how many. The folder is
written as `OUT.partial` and renamed when whole: a stopped `lcm cache` (Ctrl-C, SIGTERM, a kill, a full disk) leaves no
cache that looks finished, and the same command run again goes on from the last whole shard in OUT.partial, writing the
very cache an uninterrupted run writes. Run again after it finished, the same job (as its manifest records it: the same
data, source, VAE and text encoders, batch size and the rest that a resume compares) writes nothing, says so in one line and
exits 0, as `lcm distill` run again on a finished run does; another job is refused with one line naming what differs, and
the cache is kept. It resumes an image folder, webdataset shards or a registered dataset read with
the same --model, images and captions (of shards: the same .tar files, by their names, sizes and first bytes; a
registered dataset such as world:shapes is drawn alike at every run), --resolution, --batch-size, type of --device (cpu,
cuda or mps: each rounds its own way) and choice of --captions-only; other settings start OUT.partial again, with a note
saying why.

With --captions-only the cache holds the caption strings instead of their text embeddings, and each run encodes its
micro-batches' captions with its own model, as it does an image folder's (diffusers' training scripts do the same). In
Stable Diffusion 1.5 at 512 px a sample's latents are 64 KiB and a distinct caption's text embedding 231 KiB: where
every caption is distinct (LAION), a full cache is ~80 % text embeddings, and a captions-only one a fifth of its size.
Only the model's VAE is loaded (its UNet's or transformer's config gives the native size), and the cache records the
VAE's digest alone: any model that shares the VAE trains on it, whatever its text encoder(s). The summary line gives the
cache's size.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from latent_consistency.cli.arguments import nonnegative_int, positive_int, source
from latent_consistency.devices import resolve_device
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold


def run(args) -> None:
    """`write_cache` holding --out's lock (`folder_lock.hold`): a second `lcm cache` to the same --out would take the first's
    OUT.partial for an unfinished cache, resume or clear it and write its own shards there, under the first."""
    with hold(args.out):
        write_cache(args)


def write_cache(args) -> None:
    from latent_consistency.command_words import flag_words
    from latent_consistency.data.latent_cache import MANIFEST, LatentCache, recorded_data, write_latent_cache
    from latent_consistency.data.shards import ShardStream
    from latent_consistency.data.spec import open_dataset

    whole = check_out(args.out)
    check_data(args.data)
    device = resolve_device(args.device)
    codec, prompts, native = load_encoders(args.model, device, args.captions_only)
    resolution = cache_resolution(args, codec, native)
    size_from = f"the native size of --model {args.model}" if args.resolution is None else None
    dataset = open_dataset(args.data, resolution, size_from=size_from)
    if isinstance(dataset, LatentCache):
        raise UserError(f"--data {args.data} is a latent cache already; give the images it was made from")
    if isinstance(dataset, ShardStream) and args.num_workers:  # `UsableBatches` reads shards in this process: the workers went unused
        raise UserError(f"--num-workers {args.num_workers} starts processes that decode an image folder's images; --data {args.data} "
                        "is webdataset shards, which are read and decoded in this process: leave --num-workers out")
    # --data resolved, absolute (`recorded_data`): the runs' held-out checks read it from any folder (`training.config`)
    source = {"data": recorded_data(args.data), "model": args.model, "resolution": resolution}
    # progress as every command shows it: a bar in a terminal, whole lines in a log (`progress`), where a cache of LAION's
    # size is hours of encoding that showed nothing
    out = write_latent_cache(dataset, args.out, codec, prompts, source, device, batch_size=args.batch_size,
                             num_workers=args.num_workers, say=lambda line: print(f"lcm cache: {line}", file=sys.stderr, flush=True),
                             captions_only=args.captions_only)
    if whole:  # this job's cache, finished before: `write_latent_cache` said so in one line and wrote nothing
        return
    summary = getattr(dataset, "skipped", None)
    if summary is not None and summary.summary():
        print(f"data: {summary.summary()}")
    manifest = json.loads((out / MANIFEST).read_text())
    samples = manifest["num_samples"]  # the usable ones: the data's, less those skipped
    train = flag_words("--data", str(out)) + ([] if resolution == native else ["--resolution", str(resolution)])
    print(f"wrote a latent cache of {samples} samples at {resolution} px ({size_note(out, manifest)}) to {out}; "
          f"train on it with {shlex.join(train)}")  # --data=-c1: `--data -c1` is no value to argparse


def load_encoders(model: str, device, captions_only: bool):
    """(codec, prompt encoder, native size) of --model in float32, as the cache records their digests, none of its UNet's
    (or transformer's) weights loaded: the VAE alone for --captions-only, whose text encoder(s) would not run
    (`models.load_latent_codec`; prompts None), else the VAE and text encoder(s) (`models.load_latent_and_prompt_encoders`:
    SD 1.5's UNet was 3.4 GB read for nothing, SDXL's 10 GB)."""
    from latent_consistency.models import load_latent_and_prompt_encoders, load_latent_codec

    if captions_only:
        codec, size = load_latent_codec(model, device)
        return codec, None, size
    return load_latent_and_prompt_encoders(model, device)


def cache_resolution(args, codec, native: int) -> int:
    """The size (px) the images are read and encoded at: --resolution, checked as a run's is (`training.batches.
    check_resolution_of`: a whole number of the network's latent patches, at most MAX_SIZE_FACTOR x the native size, large
    enough for the UNet's and VAE's GroupNorms) before the data is scanned; without it the model's `native` size, as every
    cache was written before --resolution. The UNet's config is read from the folder: its weights are not loaded."""
    from latent_consistency.models import model_json, transformer_patch_size
    from latent_consistency.training.batches import check_resolution_of

    if args.resolution is None:
        return native
    patch = transformer_patch_size(model_json(args.model, "transformer/config.json"))  # PixArt-α's; a UNet model has none: 1
    check_resolution_of(args.resolution, codec.downsampling_factor, patch, native, model_json(args.model, "unet/config.json"),
                        codec.vae.config)
    return args.resolution


def size_note(out: Path, manifest: dict) -> str:
    """The size of the cache at `out` on disk and, for a full one, that of its text embeddings, which --captions-only
    leaves out (their shape from `manifest`: U distinct captions x L tokens x D float32)."""
    from latent_consistency.data.latent_cache import CAPTIONS_ONLY

    size = byte_size(sum(path.stat().st_size for path in out.iterdir()))
    if manifest.get(CAPTIONS_ONLY):
        return f"{size}, captions only: each run encodes them"
    text = manifest["num_captions"] * manifest["max_length"] * manifest["text_hidden_size"] * 4
    return f"{size}; its text embeddings are {byte_size(text)}, which --captions-only would leave out"


def byte_size(n: int) -> str:
    """`n` bytes in binary units: 512 B, 3.2 KiB, 1.5 GiB."""
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def check_data(data: str) -> None:
    """--data before the model loads: a name of blanks or none named the current folder (`Path("")` is "."), which
    was scanned as an image folder, minutes into a large one, or refused only after the model loaded."""
    if not data.strip():
        raise UserError(f"--data {data!r} names no data; give captioned images: an image folder, webdataset .tar shards or a "
                        "registered dataset such as world:shapes")


def check_out(out: str) -> bool:
    """--out before the model loads and the data is scanned (SD's model and a folder of a million images: minutes), where
    `write_latent_cache` refused it only after them: a name of blanks or none (which named the current folder, "already
    exists; remove it"), an existing folder that holds anything but a cache, or a place this user cannot make it in. An
    empty folder (or a link to one), which a user made for the cache (mkdir), is the cache's: written as OUT.partial beside
    it, which a rerun resumes, and renamed onto it when whole (`outputs.move_into_place`). A whole cache whose writer was
    stopped before it removed its progress record (`latent_cache.PARTIAL_MARK` beside its manifest) is let through:
    `write_latent_cache` finishes it. So is a whole cache whose manifest records the job that wrote it (`latent_cache.
    recorded_job`; one that records none is refused here): `write_latent_cache` compares it with this call's, once the
    model and data are open, and writes nothing where it is the same (a rerun of a pipeline after the cache finished: exit
    0, as `lcm distill` run again on a finished run), or refuses another job, keeping the cache. Whether --out is such a cache."""
    from latent_consistency.data.latent_cache import MANIFEST, PARTIAL_MARK, recorded_job, taken_folder
    from latent_consistency.outputs import check_link, check_writable, is_empty_folder, partial_folder

    if not out.strip():
        raise UserError(f"--out {out!r} names no folder; give the cache folder by its name (e.g. runs/latents)")
    path = Path(out)
    check_link(path, "--out")  # a link to nothing: not a folder that "already exists"
    if (path / MANIFEST).is_file():
        if (path / PARTIAL_MARK).is_file():
            return False
        recorded_job(path)
        return True
    if (path.exists() or path.is_symlink()) and not is_empty_folder(path):
        raise UserError(taken_folder(path))
    partial_folder(out, "runs/latents")  # a name such as "a/..", which leaves no folder name for OUT.partial
    check_writable(out, "--out")
    return False


def register(subparsers) -> None:
    p = subparsers.add_parser("cache", help="encode captioned images once into a latent cache for distill and finetune (--data)",
                              description=__doc__)
    p.add_argument("--model", required=True, type=source, help="the model the runs train: a teacher (distill) or an LCM (finetune), folder or hub id")
    p.add_argument("--data", required=True, help="captioned images: an image folder (metadata.jsonl, metadata.csv or .txt captions), "
                   "webdataset .tar shards, or a registered dataset such as world:shapes")
    p.add_argument("--out", required=True, help="the cache folder to write: a new one, or an empty folder (this job's finished cache: "
                   "nothing is written)")
    p.add_argument("--resolution", type=positive_int, help="the size (px) the images are read at, as a run with --data IMAGES "
                   "--resolution N reads them: the shorter side scaled to it and the central square kept (default: the model's "
                   "native size). A run trains on the cache with the same --resolution (SDXL at 512 px, say)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE batch (default 64)")
    p.add_argument("--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes that decode an image "
                   "folder's (or a registered dataset's) images beside the encoding (default 0: in this process; shards are read and "
                   "decoded in this process, and take none)")
    p.add_argument("--captions-only", action="store_true", help="store the caption strings instead of their text embeddings, "
                   "without running the text encoder(s); each run encodes its micro-batches' captions with its own model. In SD 1.5 "
                   "at 512 px a sample's latents are 64 KiB and a distinct caption's text embedding 231 KiB: with every caption "
                   "distinct (LAION) the cache is a fifth of the size. Any model with the same VAE trains on it")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.set_defaults(run=run)
