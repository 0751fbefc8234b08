"""The built-in toy text-to-image world: its datasets (`shapes`, `digits`), judge, build phases and the
shipped artifact. The library never imports it; importing it registers the `world:NAME` data specs
(`data.spec`), the training splits of its datasets."""

from latent_consistency.data.spec import register_scheme
from latent_consistency.world.datasets import DATASETS, get_dataset


def _training_split(name: str, resolution: int):
    return get_dataset(name, "train", resolution)


register_scheme("world", _training_split, DATASETS)
