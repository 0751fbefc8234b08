"""glibc's allocator for the CPU sampling commands: keep freed memory for the next call (`keep_freed_memory`).

glibc serves a request above its mmap threshold with a fresh mapping, whose pages fault and are zeroed on first touch,
and gives memory at the top of the heap back to the system above its trim threshold. The threshold rises with the
largest block freed, up to 32 MiB, so feature maps of about that size (the world VAE's at batch 64) are mapped anew in
every layer of every call. With the threshold at 64 MiB and trimming off, a sampling call reuses the memory the last
one freed: on a 2-core CPU the compiled generator's 4-step text to image at batch 64 ran 1.07-1.14× faster (eager
1.03-1.07×) for 4-10 MiB more peak memory (`benchmarks/allocator_speed.py`, docs/benchmarks.md). Training gained
nothing, so only the sampling commands (`lcm generate`, `lcm serve`, `lcm evaluate`) set it.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 64 << 20  # bytes: requests below this come from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # bytes of free heap top kept (the largest a C int holds): in effect, never trim
# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# A user who set glibc's allocator through the environment keeps those settings
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(device) -> bool:
    """For a command that samples on `device` (a torch.device): on the CPU, set glibc's mmap threshold to MMAP_THRESHOLD
    and its trim threshold to TRIM_THRESHOLD for this process. Whether it was set: not for a GPU, on another C library or
    system, or when the environment already sets glibc's allocator."""
    if device.type != "cpu" or not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
