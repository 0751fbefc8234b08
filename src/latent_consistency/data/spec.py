"""One string names the training data (`lcm distill --data SPEC`); `open_dataset` turns it into a dataset.

Accepted forms, checked in this order:
  world:shapes, world:digits         the built-in toy world's training split
  DIR with manifest.json             a latent cache (precomputed VAE latents)
  DIR with images                    an image folder with metadata.jsonl or .txt captions
  DIR with .tar files (no images)    webdataset shards, e.g. img2dataset's output folder
  FILE.tar, a brace pattern such as data/{00000..00009}.tar, or a glob such as data/*.tar
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, IterableDataset

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.images import IMAGE_EXTENSIONS
from latent_consistency.data.shards import ShardStream
from latent_consistency.errors import UserError

WORLD_PREFIX = "world:"
ACCEPTED = (
    "world:shapes or world:digits, a latent cache folder (with manifest.json), a folder of captioned images, "
    "a folder of .tar shards, a .tar file, a brace pattern like data/{00000..00009}.tar, or a glob like data/*.tar"
)


def open_dataset(
    spec: str, resolution: int, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Dataset | IterableDataset:
    """The dataset `spec` names (see the module docstring).

    seed, rank and world_size apply to shard streams, which shuffle and split themselves; map-style
    datasets are shuffled and split by `ResumableSampler`.
    """
    if spec.startswith(WORLD_PREFIX):
        from latent_consistency.data.datasets import get_dataset

        return get_dataset(spec.removeprefix(WORLD_PREFIX), "train", resolution)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from latent_consistency.data.latent_cache import LatentCache

            return LatentCache(path)
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*"))
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if has_images and shards:
            raise UserError(f"{path} holds both images and .tar shards; point the data spec at one kind of data")
        if has_images:
            return ImageFolderDataset(path, resolution)
        if shards:
            return ShardStream(shards, resolution, seed=seed, rank=rank, world_size=world_size)
        raise UserError(f"{path} holds no images, .tar shards or manifest.json; the data spec can be {ACCEPTED}")
    if spec.endswith(".tar") and (path.is_file() or any(ch in spec for ch in "{*?[")):
        return ShardStream(spec, resolution, seed=seed, rank=rank, world_size=world_size)
    raise UserError(f"cannot read data spec {spec!r}; it can be {ACCEPTED}")
