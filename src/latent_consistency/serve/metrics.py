"""The server's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Kept here rather than in prometheus_client: five series do not need a dependency, and the batcher's worker thread and
the event loop update them under one lock.
"""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Requests by status code, request latency, queue depth, batch sizes, images made and requests cancelled."""

    def __init__(self):
        self.lock = threading.Lock()
        self.responses: Counter[int] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_depth = 0
        self.images = 0
        self.cancelled = 0

    def response(self, status: int, seconds: float | None = None) -> None:
        with self.lock:
            self.responses[status] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_size.observe(size)
            self.images += size

    def set_queue_depth(self, depth: int) -> None:
        with self.lock:
            self.queue_depth = depth

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def exposition(self) -> str:
        with self.lock:
            lines = ["# HELP lcm_requests_total Image requests answered, by HTTP status code.", "# TYPE lcm_requests_total counter"]
            lines += [f'lcm_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.responses.items())]
            lines += ["# HELP lcm_request_seconds Time from arrival to response of successful image requests.",
                      "# TYPE lcm_request_seconds histogram", *self.latency.lines("lcm_request_seconds")]
            lines += ["# HELP lcm_queue_depth Requests waiting for the model.", "# TYPE lcm_queue_depth gauge",
                      f"lcm_queue_depth {self.queue_depth}"]
            lines += ["# HELP lcm_batch_size Images per forward pass.", "# TYPE lcm_batch_size histogram",
                      *self.batch_size.lines("lcm_batch_size")]
            lines += ["# HELP lcm_images_total Images generated.", "# TYPE lcm_images_total counter", f"lcm_images_total {self.images}"]
            lines += ["# HELP lcm_cancelled_total Requests dropped before their batch ran (the client went away).",
                      "# TYPE lcm_cancelled_total counter", f"lcm_cancelled_total {self.cancelled}"]
            return "\n".join(lines) + "\n"
