"""Progress of every long phase (training steps, caches, evaluation rows, world builds, image batches): a tqdm bar where
someone watches it, whole lines where stderr goes to a file.

tqdm redraws its bar with carriage returns up to 10 times a second. In a terminal or a Jupyter cell that is one live
line; in a log (`nohup lcm distill ... > LOG 2>&1`, SLURM, CI, `| tee`) it is one endless "line" of redraws that `cat`
and `less` show as garbage, megabytes of it in a long run. There each phase writes a line every `INTERVAL` seconds
(`LCM_PROGRESS_INTERVAL` changes it) and one when it ends:

    distill lcd: 1200/4000 (30 %), 3.1 step/s, loss 0.0123, samples_per_s 24.8, ETA 15 min 03 s
    distill lcd: 4000/4000 (100 %), 3.09 step/s, loss 0.0101, samples_per_s 24.7, done in 21 min 34 s

A phase that stops (an error, Ctrl-C, a scheduler's SIGTERM) writes no line of its own: the stop's one line follows.
`TQDM_DISABLE=1` silences both kinds, as it does tqdm's bars.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator
from time import monotonic

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

from latent_consistency.errors import UserError

INTERVAL = 30.0  # seconds between a log's lines: 120 lines an hour, a 100k-step run's log stays readable
INTERVAL_VARIABLE = "LCM_PROGRESS_INTERVAL"


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, initial: float = 0, unit: str = "it",
                 disable: bool = False):
    """What tqdm(iterable, desc=..., total=..., initial=..., unit=..., disable=...) gives in a terminal or a notebook;
    elsewhere a `LogLines` with the same `update`, `set_postfix`, iteration and `with`. Disabled also by TQDM_DISABLE."""
    disable = disable or bool(os.environ.get("TQDM_DISABLE"))  # as tqdm reads it: any non-empty value
    if disable or sys.stderr.isatty() or in_notebook():
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, disable=disable)
    return LogLines(iterable, desc=desc, total=total, initial=initial, unit=unit, interval=log_interval())


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (tqdm.auto's test): its cell redraws tqdm's widget, or its text bar's
    carriage returns, though stderr is no terminal."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


def log_interval() -> float:
    """Seconds between a log's progress lines: `LCM_PROGRESS_INTERVAL` (0: at every update; inf: only at the end), else
    `INTERVAL`."""
    value = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not value:
        return INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise UserError(f"{INTERVAL_VARIABLE} is {value!r}; set it to the seconds between progress lines in a log, e.g. 60, "
                        "or unset it")
    return seconds


class LogLines:
    """A progress bar for a log: a whole line at the first update `interval` seconds after the last line, with the rate
    since that line and the ETA at it, and one at the end with the phase's mean rate and time. The end is a `with`
    block left without an exception, the iterable run out, or `close()`."""

    def __init__(self, iterable: Iterable | None, desc: str, total: float | None, initial: float, unit: str, interval: float):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit, self.interval = iterable, desc, total, unit, interval
        self.n = self.initial = initial
        self.postfix: dict[str, str] = {}
        self.start = self.last_update = self.line_time = monotonic()
        self.line_n = initial
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        self.closed = True  # a stop's one line comes next, alone

    def update(self, n: float = 1) -> None:
        """`n` more done; a line if `interval` has passed since the last, unless all is done: the end line says that."""
        self.n += n
        self.last_update = now = monotonic()
        if now - self.line_time >= self.interval and (self.total is None or self.n < self.total):
            rate = rate_of(self.n - self.line_n, now - self.line_time)
            eta = (self.total - self.n) / rate if rate and self.total is not None else None
            self.write(rate, f"ETA {duration(eta)}" if eta is not None else None)
            self.line_time, self.line_n = now, self.n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        """The fields the bar shows after its rate (the training loop's loss and samples_per_s), numbers as tqdm shows them."""
        fields = {**(ordered_dict or {}), **kwargs}
        self.postfix = {key: value if isinstance(value, str) else std_tqdm.format_num(value) for key, value in fields.items()}

    def close(self) -> None:
        """The end line, once."""
        if not self.closed:
            self.closed = True
            spent = self.last_update - self.start
            self.write(rate_of(self.n - self.initial, spent), f"done in {duration(spent)}")

    def write(self, rate: float | None, end: str | None) -> None:
        count = f"{self.n:.0f}" if self.total is None else f"{self.n:.0f}/{self.total:.0f} ({100 * self.n / max(self.total, 1):.0f} %)"
        fields = [count, speed(rate, self.unit), *(f"{key} {value}" for key, value in self.postfix.items()), end]
        print(f"{self.desc}: " + ", ".join(f for f in fields if f), file=sys.stderr, flush=True)


def rate_of(done: float, seconds: float) -> float | None:
    """Units per second, or None when there is nothing to measure it by."""
    return done / seconds if done > 0 and seconds > 0 else None


def speed(rate: float | None, unit: str) -> str | None:
    """A rate as tqdm turns it: "3.1 step/s", or "4.2 s/step" below one a second."""
    if rate is None:
        return None
    if rate < 1:
        return f"{1 / rate:.3g} s/{unit}"
    return f"{rate:.3g} {unit}/s" if rate < 1000 else f"{rate:.0f} {unit}/s"


def duration(seconds: float) -> str:
    """Seconds as a log reader reads them: "8.2 s", "6 min 05 s", "2 h 03 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
