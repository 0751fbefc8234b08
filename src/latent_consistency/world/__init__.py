"""The built-in toy text-to-image world: its datasets (`shapes`, `digits`), judge, build phases and the
shipped artifact. The library never imports it; importing it registers the `world:NAME[:SPLIT]` data specs
(`data.spec`): a split of one of its datasets, the training split when none is named."""

from latent_consistency.data.spec import register_scheme
from latent_consistency.world.datasets import DATASETS, get_dataset


def _open(name: str, resolution: int, size_from: str | None = None):
    dataset, _, split = name.partition(":")
    return get_dataset(dataset, split or "train", resolution, size_from=size_from)


def _canonical(name: str) -> str:
    dataset, _, split = name.partition(":")
    return f"{dataset}:{split or 'train'}"


register_scheme("world", _open, DATASETS, _canonical)
