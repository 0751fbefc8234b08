"""One string names the training data (`lcm distill --data SPEC`); `open_dataset` turns it into a dataset.

A held-out split (`Holdout`) keeps one side of a split by file: image files of a folder, .tar shards, samples of
a named dataset, and a latent cache's samples by the file, shard or sample each was encoded from (as its data's split).

Accepted forms, checked in this order:
  SCHEME:NAME                        a dataset of a registered scheme (`register_scheme`; the built-in
                                     world registers world:shapes and world:digits, its training splits)
  DIR with manifest.json             a latent cache (precomputed VAE latents)
  DIR with images                    an image folder with metadata.jsonl, metadata.csv or .txt captions
  DIR with .tar files (no images)    webdataset shards at any depth, e.g. img2dataset's output folder
  FILE.tar, a brace pattern such as data/{00000..00009}.tar, or a glob such as data/*.tar (.TAR alike)
Compressed shards (.tar.gz, .tgz, ...) are refused in one line saying to decompress them (`shards.check_uncompressed`).
Hidden files and folders (a name starting with ".", as macOS's ._00000.tar) are no part of a folder's data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset, IterableDataset, Subset

from latent_consistency.data.holdout import Holdout
from latent_consistency.data.imagefolder import ImageFolderDataset, extension, linked_paths, visible_names
from latent_consistency.data.images import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from latent_consistency.data.shards import COMPRESSED_SUFFIXES, ShardStream, check_uncompressed, expand_urls
from latent_consistency.errors import UserError

# Named dataset schemes: "world" -> (a function of (name, resolution, size_from) giving that dataset, the names it knows).
# The library knows none; the built-in world registers its own when imported (`latent_consistency.world`).
SCHEMES: dict[str, tuple[Callable[[str, int, str | None], Dataset], tuple[str, ...]]] = {}
# Each scheme's one spelling of a NAME that has several ("shapes" and "shapes:train"), for `canonical_spec`.
CANONICAL_NAMES: dict[str, Callable[[str], str]] = {}


def register_scheme(scheme: str, open_named: Callable[[str, int, str | None], Dataset], names: tuple[str, ...],
                    canonical: Callable[[str], str] | None = None) -> None:
    """Let data specs `SCHEME:NAME` name the datasets `names` that `open_named(NAME, resolution, size_from)` opens (see
    `open_dataset` for `size_from`); `canonical(NAME)` spells alike the NAMEs that open the same data."""
    SCHEMES[scheme] = (open_named, names)
    if canonical is not None:
        CANONICAL_NAMES[scheme] = canonical


def canonical_spec(spec: str) -> str:
    """`spec` spelled as every spec naming the same registered dataset is (world:shapes and world:shapes:train alike)."""
    scheme, _, name = spec.partition(":")
    return f"{scheme}:{CANONICAL_NAMES[scheme](name)}" if name and scheme in CANONICAL_NAMES else spec


def accepted() -> str:
    """The forms a data spec can take, for error messages."""
    named = [f"{scheme}:{name}" for scheme, (_, names) in SCHEMES.items() for name in names]
    return ", ".join(named + [
        "a latent cache folder (with manifest.json), a folder of captioned images, a folder of .tar shards, a .tar file, "
        "a brace pattern like data/{00000..00009}.tar, or a glob like data/*.tar"])


def open_dataset(
    spec: str, resolution: int, seed: int = 0, rank: int = 0, world_size: int = 1, holdout: Holdout | None = None,
    size_from: str | None = None, quiet_scan: bool = False,
) -> Dataset | IterableDataset:
    """The dataset `spec` names (see the module docstring), or one side of a held-out split of it (`holdout`).

    seed, rank and world_size apply to shard streams, which shuffle and split themselves; map-style
    datasets are shuffled and split by `ResumableSampler`. `size_from` says where `resolution` came from when the user did
    not give it ("the native size of --model M"), for a registered dataset that does not come in that size to say so.
    `quiet_scan`: an image folder's scan is counted without its log lines, for a reader of a folder that another one logs
    (`_logs_scan`): the held-out data that every process of a multi-process run reads whole, as rank 0 of 1.
    """
    if not spec.strip():  # Path("") is ".": the current folder was scanned as the data
        raise UserError(f"data spec {spec!r} names no data; it can be {accepted()}")
    scheme, _, name = spec.partition(":")
    if name and scheme in SCHEMES:
        dataset = SCHEMES[scheme][0](name, resolution, size_from)
        return dataset if holdout is None else Subset(dataset, holdout.select([str(i) for i in range(len(dataset))], "samples"))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from latent_consistency.data.latent_cache import LatentCache

            return LatentCache(path, holdout)
        return _open_folder(path, resolution, seed, rank, world_size, holdout, quiet_scan)
    if spec.lower().endswith(".tar") and (path.is_file() or any(ch in spec for ch in "{*?[")):
        return _shard_stream(spec, resolution, seed, rank, world_size, holdout)
    if spec.lower().endswith(COMPRESSED_SUFFIXES):
        check_uncompressed([spec])
    raise UserError(f"cannot read data spec {spec!r}; it can be {accepted()}")


def read_paths(spec: str) -> dict[Path, str | None]:
    """The resolved files and folders that data spec `spec` reads, each with the symlink it is read through (None where
    the spec names it itself): its folder and, unless it is a latent cache (which reads its own files only), the targets
    of the symlinked folders, images and shards inside it (`linked_paths`); or the shards of a shard pattern. Empty for a
    spec that names neither (a registered dataset; a missing path, whose own error comes when it is opened)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        reads: dict[Path, str | None] = {path.resolve(): None}
        if not (path / "manifest.json").is_file():
            for real, link in linked_paths(path, (*IMAGE_EXTENSIONS, ".tar")):
                reads.setdefault(real, link)
        return reads
    if not spec.lower().endswith(".tar"):
        return {}
    try:
        return {Path(url).resolve(): None for url in expand_urls(spec)}
    except UserError:
        return {}


def _open_folder(path: Path, resolution: int, seed: int, rank: int, world_size: int, holdout: Holdout | None, quiet_scan: bool):
    """The image folder or the shards of folder `path`, told apart by one listing of its files, which the image folder
    takes as its own: a walk of a LAION-sized folder (12 million files) takes minutes, and every process of a run makes
    it. A folder of neither is refused, saying why (.heic photos alone, compressed shards, nothing of either)."""
    files = sorted(visible_names(path))
    has_images = any(extension(name) in IMAGE_EXTENSIONS for name in files)
    shards = [str(path / name) for name in files if extension(name) == ".tar"]  # not macOS's ._00000.tar: hidden
    if has_images and shards:
        raise UserError(f"{path} holds both images and .tar shards; point the data spec at one kind of data")
    if shards:
        return _shard_stream(shards, resolution, seed, rank, world_size, holdout)
    if has_images or any(extension(name) in UNSUPPORTED_IMAGE_EXTENSIONS for name in files):
        quiet = quiet_scan or not _logs_scan(rank, holdout)
        return ImageFolderDataset(path, resolution, holdout, files=files, quiet_scan=quiet)  # .heic alone: refused, saying what to do
    check_uncompressed([str(path / name) for name in files])  # a folder of .tar.gz shards, refused saying why
    raise UserError(f"{path} holds no images, .tar shards or manifest.json; the data spec can be {accepted()}")


def _logs_scan(rank: int, holdout: Holdout | None) -> bool:
    """Whether this reader of an image folder logs what the folder's scan skipped, which every reader of it finds alike:
    the first process's, and of a held-out split (--eval-fraction) its training side's, which a run always opens; the
    folder is then named once in the log, not once per process or twice for its two sides."""
    return rank == 0 and (holdout is None or holdout.part == "train")


def _shard_stream(urls, resolution: int, seed: int, rank: int, world_size: int, holdout: Holdout | None) -> ShardStream:
    """Shards hold out whole .tar files, by name."""
    shards = expand_urls(urls)
    if holdout is not None:
        shards = [shards[i] for i in holdout.select([Path(s).name for s in shards], "shards")]
    return ShardStream(shards, resolution, seed=seed, rank=rank, world_size=world_size)
