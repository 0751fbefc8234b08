"""An infinite, rank-sharded, exactly resumable sampler for map-style datasets.

The global sequence is epoch after epoch of permutations of range(n), epoch e's permutation drawn from
(seed, e) alone. Rank r of W takes global positions r, r + W, r + 2W, ...: rank r's b-th local batch of
B samples is then exactly its share of positions [b·B·W, (b+1)·B·W), so the union over ranks of one
step's batches is the batch a single process with batch size B·W would draw. Epochs roll over in the
global sequence, not per rank, so no sample is dropped or repeated at an epoch boundary.

The state is the global position of the next row of W samples, as (epoch, index): the same on every
rank when ranks consume in lockstep, so one copy in a checkpoint resumes every rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from latent_consistency.errors import UserError


class ResumableSampler(Sampler[int]):
    """Infinite epoch-wise permutations of range(num_samples) from (seed, epoch), sharded by rank."""

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise UserError("the dataset is empty; give it at least one usable sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._row = 0  # global position of the next row of world_size samples
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perm

    def __iter__(self) -> Iterator[int]:
        """Continues from the current position (0, or the one loaded); never ends."""
        while True:
            epoch, index = divmod(self._row + self.rank, self.num_samples)
            self._row += self.world_size
            yield int(self._permutation(epoch)[index])

    def state_dict(self, in_flight: int = 0) -> dict[str, int]:
        """The position just after the last sample consumed.

        in_flight: samples this rank's DataLoader has drawn from the sampler but not delivered yet, i.e.
        prefetch_factor × num_workers × batch_size with worker processes, 0 without (a DataLoader
        without workers draws indices only for the batch it is about to return).
        """
        epoch, index = divmod(self._row - in_flight * self.world_size, self.num_samples)
        return {"epoch": epoch, "index": index, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples:
            raise UserError(
                f"the data position was saved for a dataset of {state['num_samples']} samples, this one has "
                f"{self.num_samples}; resume with the same data, or start a new run"
            )
        self._row = state["epoch"] * self.num_samples + state["index"]
