"""Batch parts: on a CPU, a network whose feature maps for the whole batch are tens of MiB runs faster in parts.

The reason is the allocator, not the arithmetic. glibc's malloc serves a request above its mmap threshold with a fresh
mapping, whose pages fault (and are zeroed) on first touch, and unmaps it when freed. The threshold starts at 128 KiB
and rises with the largest block freed so far, up to 32 MiB on 64-bit Linux; above that every request is a fresh
mapping. The world's VAE at a batch of 256 images makes 32 MiB feature maps: every layer of every call pays the page
faults. In parts of 4 MiB the same memory is reused from malloc's heap. On the 2-core development CPU this makes the
encode of 256 images 1.7-2.1× and the decode of 200 latents 1.4-1.8× faster; with the allocator told to keep
everything on its heap (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) one call is as fast as the parts
(docs/benchmarks.md). That setting is the whole process's, and made training slower (the sampling commands make it:
`allocator.keep_freed_memory`), so this module keeps each call's memory on the heap instead. Each part computes the
same function: results equal one call up to float rounding.

On a GPU a batch is one call: parts would only leave the device idle between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The feature-map bytes per part: well under glibc's largest mmap threshold (32 MiB), so that the heap serves them once the
# threshold has risen; parts of 2-8 MiB measured equally fast on the development CPU.
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
