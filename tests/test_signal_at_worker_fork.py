"""A stop (Ctrl-C, SIGTERM) that lands while a DataLoader starts its worker processes (`data.workers.started`): it ended
nothing. Raised inside the fork, in an at-fork hook (logging's `_releaseLock`), it was printed as "Exception ignored" and
dropped, and `lcm world build` ran all its phases and exited 0; raised in the iterator's `__init__`, it stopped the
command with an AttributeError ("no attribute '_shutdown'") printed under its one line. The signal is sent by this process
to itself at those two points, so each test is the same on every run, not a race."""

import gc
import multiprocessing
import os
import signal
import sys
import threading

import pytest
import torch

from latent_consistency.cli import Terminated, _terminated
from latent_consistency.data.workers import read_batches
from latent_consistency.world.build import _render

_armed: list[signal.Signals] = []  # the signal to send at the next fork's point, once


def _send_armed() -> None:
    """Send the armed signal to this process: its Python handler runs here, at once (`os.kill` runs it before it returns)."""
    if _armed:
        os.kill(os.getpid(), _armed.pop())


# Registered once for the whole test session (at-fork hooks cannot be removed), and a no-op unless armed
os.register_at_fork(after_in_parent=_send_armed)


def _at_the_first_queue(monkeypatch) -> None:
    """Send the armed signal inside `_MultiProcessingDataLoaderIter.__init__`, at its first queue: before it sets the
    `_shutdown` that its `__del__` reads."""
    queue = torch.multiprocessing.Queue
    monkeypatch.setattr(torch.multiprocessing, "Queue", lambda *args, **kwargs: (_send_armed(), queue(*args, **kwargs))[1])


class _Items(torch.utils.data.Dataset):
    """Items as both readers take them; the caption says which handlers the process reading them has for Ctrl-C
    and SIGTERM (a DataLoader worker's)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        ctrl_c = "raises" if signal.getsignal(signal.SIGINT) is signal.default_int_handler else "other"
        sigterm = "quiet" if callable(signal.getsignal(signal.SIGTERM)) else "torch's"  # torch's is C code
        return {"image": torch.zeros(3, 8, 8), "caption": f"ctrl-c {ctrl_c}, sigterm {sigterm}", "attributes": {}}


def _read(reader: str) -> list[str]:
    """The captions of `_Items` read by one worker process: by `read_batches` (training, `lcm cache`) or `_render`
    (`lcm world build`)."""
    if reader == "read_batches":
        return [caption for _, captions in read_batches(_Items(), 2, 1, []) for caption in captions]
    return _render(_Items(), progress=False).captions


@pytest.fixture
def handlers():
    """The handlers `lcm` sets (Ctrl-C's KeyboardInterrupt, SIGTERM's `cli.Terminated`), and the test runner's put back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _terminated)
    yield
    signal.signal(signal.SIGINT, before[0])
    signal.signal(signal.SIGTERM, before[1])
    _armed.clear()


@pytest.mark.parametrize("reader", ["read_batches", "_render"])
@pytest.mark.parametrize("where", ["in an at-fork hook", "in the iterator's __init__"])
@pytest.mark.parametrize("stop, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_stop_while_the_workers_start_reaches_the_caller_without_a_message(handlers, monkeypatch, reader, where, stop, raised):
    """The stop reaches the caller as its exception (then the command's one line), nothing is printed as "Exception
    ignored", no worker process is left, and the handlers are those of before."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # `_render` uses a worker where a core is to spare
    if where == "in the iterator's __init__":
        _at_the_first_queue(monkeypatch)
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    before = set(multiprocessing.active_children())
    _armed.append(stop)
    with pytest.raises(raised):
        _read(reader)
    gc.collect()  # the iterator, held by the exception's frames, shuts its workers down when freed
    assert not _armed, "the signal was not sent"
    assert [f"{u.exc_type.__name__}: {u.exc_value} in {u.object}" for u in ignored] == []
    assert not set(multiprocessing.active_children()) - before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) is _terminated


@pytest.mark.parametrize("reader", ["read_batches", "_render"])
def test_workers_started_under_the_hold_have_the_main_process_handler_for_ctrl_c(handlers, monkeypatch, reader):
    """A worker is forked while the stops are held, with their handlers that only note a signal: it takes back Ctrl-C's
    KeyboardInterrupt, on which torch's worker loop ends quietly, and has its own quiet SIGTERM handler
    (`end_quietly_on_sigterm`). Without the first, a worker only noted a Ctrl-C to the process group and
    ran on until the main process ended it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _read(reader) == ["ctrl-c raises, sigterm quiet"] * 2


def test_workers_started_from_another_thread_hold_nothing(handlers, monkeypatch):
    """Python sets handlers (and runs them) in the main thread only: from any other thread (a server's, a notebook's
    background job) the workers start as before, where holding the stops raised ValueError."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    read = []
    thread = threading.Thread(target=lambda: read.extend(_read("read_batches")))
    thread.start()
    thread.join(timeout=120)
    assert read == ["ctrl-c raises, sigterm quiet"] * 2
