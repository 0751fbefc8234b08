"""A bounded queue of jobs and one worker thread that runs compatible jobs as one batch.

The model runs on one thread (one forward at a time uses the whole device); the event loop only queues. When the
worker takes a job it also takes every queued job with the same key (`request.Job.key`: same steps, guidance, size,
...) up to `max_batch`, waiting at most `max_wait_s` for more to arrive. A batch that fails is run again job by job, so
only the job at fault fails. Jobs whose client went away are cancelled in the queue and never run. A full queue refuses
new jobs (`QueueFull`; the app answers 429). A request holds its place (`place`) from the moment it is admitted, before
its upload is decoded: the queue and the places held together never pass `max_queue`, so a full queue refuses at once,
before any costly work.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from latent_consistency.serve.metrics import Metrics


class QueueFull(Exception):
    pass


@dataclass
class Place:
    """A place in the queue held for a request not yet queued (`Batcher.place`); `held` until its job is submitted."""

    held: bool = True


@dataclass
class Pending:
    job: object  # anything with a `key`
    future: Future = field(default_factory=Future)


class Batcher:
    """`submit(job) -> Future` of `run_batch([jobs])[i]`; `start()` / `stop()` the worker."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 8, max_queue: int = 32, max_wait_s: float = 0.005,
                 metrics: Metrics | None = None):
        self.run_batch = run_batch
        self.max_batch, self.max_queue, self.max_wait_s = max_batch, max_queue, max_wait_s
        self.metrics = metrics or Metrics()
        self.queue: deque[Pending] = deque()
        self.held = 0  # places held by admitted requests not yet queued (`place`)
        self.ready = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    @contextmanager
    def place(self) -> Iterator[Place]:
        """Hold a place in the queue for a request while it is prepared (its upload decoded), for `submit(job, place)`;
        `QueueFull` at once when the queue and the places held fill `max_queue`. Given back on leaving unless submitted."""
        with self.ready:
            self._check_room()
            self.held += 1
        place = Place()
        try:
            yield place
        finally:
            with self.ready:
                if place.held:
                    self.held -= 1
                    place.held = False

    def submit(self, job, place: Place | None = None) -> Future:
        """Queue `job`, in the place it holds (`place`) or in a free one (`QueueFull` if none)."""
        with self.ready:
            if place is not None and place.held:
                self.held -= 1
                place.held = False
            else:
                self._check_room()
            pending = Pending(job)
            self.queue.append(pending)
            self.metrics.set_queue_depth(len(self.queue))
            self.ready.notify()
        return pending.future

    def cancel(self, future: Future) -> bool:
        """Cancel a queued job (its client went away) and take it out of the queue and its depth at once; False when it
        already runs (its result is then dropped)."""
        with self.ready:
            cancelled = future.cancel()
            self._drop_cancelled()
            self.metrics.set_queue_depth(len(self.queue))
        return cancelled

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="lcm-batcher", daemon=True)
        self.thread.start()

    def stop(self, wait: bool = True) -> None:
        """Cancel the queued jobs and end the worker thread once the batch it is making (if any) is made: waited for, unless
        not `wait` (a forced stop, which ends the process without it: `cli.end_at_once`)."""
        with self.ready:
            self.stopping = True
            for pending in self.queue:
                pending.future.cancel()
            self.queue.clear()
            self.ready.notify_all()
        if self.thread is not None and wait:
            self.thread.join()

    def _check_room(self) -> None:
        """`QueueFull` when the queued jobs and the places held fill `max_queue` (called holding the lock)."""
        self._drop_cancelled()
        if len(self.queue) + self.held >= self.max_queue:
            raise QueueFull(f"{len(self.queue) + self.held} requests are waiting (queued, or their upload being read); try again shortly")

    def _drop_cancelled(self) -> None:
        self.queue = deque(p for p in self.queue if not p.future.cancelled())

    def _take_batch(self) -> list[Pending]:
        """The oldest live job and the queued jobs that share its key (FIFO), after waiting up to max_wait_s for more."""
        with self.ready:
            # drop, then look: a client cancels its job at any moment, outside this lock (a job seen live may be gone next)
            self._drop_cancelled()
            while not self.stopping and not self.queue:
                self.ready.wait()
                self._drop_cancelled()
            if self.stopping:
                return []
            key = self.queue[0].job.key
            deadline = time.monotonic() + self.max_wait_s
            while (sum(p.job.key == key for p in self.queue) < self.max_batch and not self.stopping
                   and (remaining := deadline - time.monotonic()) > 0):
                self.ready.wait(remaining)
            self._drop_cancelled()
            batch = [p for p in self.queue if p.job.key == key][: self.max_batch]
            taken = {id(p) for p in batch}
            self.queue = deque(p for p in self.queue if id(p) not in taken)
            self.metrics.set_queue_depth(len(self.queue))
        # A job cancelled from here on is past the point of no return: it runs, its result is dropped
        return [p for p in batch if p.future.set_running_or_notify_cancel()]

    def _work(self) -> None:
        while not self.stopping:
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Pending]) -> None:
        """Run a batch and hand each job its result. A batch that fails runs again one job at a time, so that one bad job
        fails alone and not every request it was batched with; the worker survives either way."""
        try:
            results = self.run_batch([p.job for p in batch])
        except BaseException as err:
            if len(batch) == 1:
                batch[0].future.set_exception(err)
            else:
                for pending in batch:
                    self._run([pending])
            return
        self.metrics.batch(len(batch))
        for p, result in zip(batch, results):
            p.future.set_result(result)
