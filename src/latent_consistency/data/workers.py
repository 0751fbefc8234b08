"""DataLoader worker processes that read as the main process reads: a data error is its one line, what the data skipped
is counted once, a stop of the whole process group ends the command in its own one line, and so does a worker killed
(`worker_death`), and a stop while they start ends it too (`started`). Used by training (`training.batches`) and by the
commands that encode data in bulk (`data.latent_cache`, `lcm world build`)."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from latent_consistency.data.images import SkipEvents
from latent_consistency.errors import UserError


class ErrorsAsValues(Dataset):
    """A map-style `dataset` as DataLoader worker processes read it: a UserError raised by a sample comes back as {"error": its
    message}, for the main process to raise (`collate`). DataLoader re-raises a worker's exception with "Caught UserError
    in DataLoader worker process 0" and the worker's traceback in its message, which the user would read where one line
    belongs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except UserError as err:
            return {"error": str(err)}


def collate(items: list[dict | None]) -> tuple[torch.Tensor | None, list[str], list[tuple[str, str]], str | None]:
    """The batch of the items that are not None (None: a sample left out, a corrupt image that a latent cache does not
    write), or None for the images when every item is; in a DataLoader worker what its copy of the dataset's `SkipCounter`
    counted since its last batch (`take_pending`), which would stay in its process otherwise ([] in the main process); and
    the message of a sample's UserError (`ErrorsAsValues`), None without one."""
    info = torch.utils.data.get_worker_info()
    skipped = getattr(info.dataset.dataset, "skipped", None) if info is not None else None
    events = skipped.take_pending() if skipped is not None else []
    items = [item for item in items if item is not None]
    error = next((item["error"] for item in items if "error" in item), None)
    if error is not None or not items:
        return None, [], events, error
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items], events, None


# The stops a user or a scheduler sends (Ctrl-C, SIGTERM: `cli.Terminated`); their handlers while `started` holds them
STOPS = (signal.SIGINT, signal.SIGTERM)
_handlers_before_hold: dict[int, object] = {}


def end_quietly_on_sigterm(worker_id: int) -> None:
    """A DataLoader worker ends at once on SIGTERM, as torch's own handler ends it on the main process's SIGTERM: a stop of the
    whole process group (a scheduler's, `timeout`'s, `kill -- -PGID`) reaches the main process too, which ends the command
    with its one line. torch's handler re-raised a SIGTERM from any other sender, and the main process then stopped with
    "DataLoader worker (pid N) is killed by signal: Terminated" and a traceback before it handled its own SIGTERM.
    A worker forked while `started` held the stops first takes back the handlers the main process had before: Ctrl-C's
    KeyboardInterrupt ends it quietly, as torch's worker loop ends on it."""
    for stop, handler in _handlers_before_hold.items():
        signal.signal(stop, handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def started(loader: torch.utils.data.DataLoader) -> Iterator:
    """`loader`'s iterator, its worker processes forked while a stop is held: noted, then raised here once they run.
    Unheld, its Python handler ran wherever the main thread then was: inside the fork, in an at-fork hook (logging's
    `_releaseLock`), where CPython prints "Exception ignored" and drops the exception, so that `lcm world build` ran every
    phase and exited 0; or inside the iterator's `__init__`, whose `__del__` then printed an AttributeError ("no attribute
    '_shutdown'") under the stop's one line. Held by a handler that only notes the signal, not blocked with
    `signal.pthread_sigmask`: that blocks it in this thread alone, and a thread that does not block it (tqdm's monitor) then
    takes it, its Python handler still running in the main thread, inside the fork. Python runs handlers (and sets them)
    in the main thread only: in any other thread a stop cannot raise inside the fork, and nothing is held. A stop whose
    handler Python did not set (None: C code's) is not held."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    held = []
    try:
        for stop in STOPS:
            if signal.getsignal(stop) is not None:
                _handlers_before_hold[stop] = signal.signal(stop, lambda signum, frame: held.append(signum))
        return iter(loader)
    finally:
        # SIGTERM's set back first: a stop raised by its handler set back (`signal.signal` runs pending handlers before it
        # sets one) leaves the next one held. Ctrl-C's raises in every process, SIGTERM's where one was set (`lcm`, which
        # then ends): held SIGTERM would be lost where a caller goes on after Ctrl-C (a notebook)
        for stop, handler in reversed(_handlers_before_hold.items()):
            signal.signal(stop, handler)
        _handlers_before_hold.clear()
        for stop in held:
            signal.raise_signal(stop)  # its own handler, now where its exception reaches the caller


# torch's words for a worker that died: killed by a signal (named as strsignal names it), or ended without one
_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]+)\.")
_ENDED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) exited unexpectedly")
_SIGNALS = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
# Why the kernel kills a worker with these signals: the out-of-memory killer, and a full /dev/shm where workers pass tensors
_LIKELY = {"SIGKILL": ", most likely for lack of memory", "SIGBUS": ", most likely for lack of shared memory (/dev/shm)"}


def worker_death(err: BaseException, option: str | None) -> str | None:
    """The one line of a DataLoader worker process that died (None for any other error): killed by the out-of-memory killer,
    say. torch raises it from its SIGCHLD handler wherever the main process then is (inside the optimiser's step, say), so
    its traceback tells nothing about the worker, where the signal and what to do would. `option`: the command's option that sets
    the number of workers (None where it has none). The error may be chained under torch's "exited unexpectedly"."""
    messages = []
    while err is not None:
        messages.append(str(err))
        err = err.__cause__ or err.__context__
    fewer = f"use fewer {option} (0 reads the data in this process) or free memory" if option else "free memory and run it again"
    for message in messages:
        if killed := _KILLED.search(message):
            name = _SIGNALS.get(killed.group(2), killed.group(2))
            return f"a data worker process (pid {killed.group(1)}) was killed by {name}{_LIKELY.get(name, '')}: {fewer}"
    for message in messages:
        if ended := _ENDED.search(message):
            see = f"rerun with {option} 0, which reads the data in this process, to see why" if option else fewer
            return f"a data worker process (pid {ended.group(1)}) ended unexpectedly: {see}"
    return None


def read_batches(dataset, batch_size: int, num_workers: int, worker_skips: SkipEvents | list[tuple[str, str]],
                 sampler=None) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches (images, captions) of `dataset` in `sampler`'s order (its own without one), read by `num_workers` DataLoader
    worker processes (none: this one) as this process reads: a sample's UserError raised here in its one line, what the
    workers skipped added to `worker_skips` (for the dataset's `SkipCounter.with_counted`), a group SIGTERM ending them
    quietly, a stop while they start raised (`started`), a batch of left-out samples (None) skipped."""
    counter = getattr(dataset, "skipped", None)
    if num_workers and counter is not None:
        counter.pending = []  # each worker's copy keeps what it counts, for `collate` to send back
    loader = torch.utils.data.DataLoader(ErrorsAsValues(dataset) if num_workers else dataset, batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, collate_fn=collate, worker_init_fn=end_quietly_on_sigterm)
    for images, captions, events, error in started(loader):
        worker_skips += events
        if error is not None:
            raise UserError(error)
        if images is not None:
            yield images, captions
