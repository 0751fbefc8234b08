"""Cache-sized batches: a convolutional network on a CPU runs a large batch fastest in parts whose feature maps fit in cache.

A convolution, group norm or activation reads its whole input and writes its whole output before the next layer starts.
When one layer's feature maps for the batch are larger than the CPU's cache, every layer goes to main memory; in parts
of a few MiB each they stay in cache. On the 2-core development CPU (1 MiB L2 per core, 32 MiB L3), the world's VAE
(32 px images, 128 KiB feature maps per image) encodes and decodes a batch of 256 about 2× faster in parts of 16-32
images than in one call, and 1.3× in parts of 128 (docs/benchmarks.md); the UNet on 8×8 latents (8 KiB per image)
gains nothing. Each part computes the same function, so results equal one call up to float rounding.

On a GPU a batch is one call: parts would only leave the device idle between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The feature-map bytes per part: 2-8 MiB measured equally fast on the development CPU; 4 MiB leaves room for the layer's
# output beside its input within a typical L3.
PART_BYTES = 4 * 2**20


def part_size(bytes_per_item: int, device: torch.device | str) -> int | None:
    """Items per part for a network whose largest feature map of one item is `bytes_per_item`: as many as fit in
    `PART_BYTES`, at least 1, on a CPU; None (the whole batch at once) on any other device."""
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    if torch.device(device).type != "cpu":
        return None
    return max(1, PART_BYTES // bytes_per_item)


def in_parts(fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """`fn(batch)`, computed as `fn` of consecutive parts of at most `size` items joined along the batch dimension;
    one call when `size` is None or covers the batch."""
    if size is None or len(batch) <= size:
        return fn(batch)
    return torch.cat([fn(part) for part in batch.split(size)])
