"""Load test of `lcm serve` on loopback: N concurrent clients for a fixed time against one server process.

    python benchmarks/serve_load.py --model runs/demo/distill/lcm --clients 16 --seconds 60

Each client posts text-to-image requests back to back (a world caption, a random seed, 4 steps, the model's default
guidance), so requests that arrive together share a forward pass. Reports the status codes seen (only 200 and 429
are acceptable), p50/p95 latency of the 200s, images/s, the server's resident memory after the warm-up and at the
end, and the batch sizes from its /metrics. Writes serve_load.json next to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from latent_consistency.world.shapes import COLORS, SHAPES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def client(url: str, stop_at: float, seed: int, results: list, codes: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as http:
        while time.monotonic() < stop_at:
            prompt = f"a large {rng.choice(COLORS)} {rng.choice(SHAPES)} at the center on a gray background"
            start = time.perf_counter()
            response = http.post(f"{url}/v1/images", json={"prompt": prompt, "seed": rng.randrange(2**31), "steps": 4})
            seconds = time.perf_counter() - start
            with lock:
                codes[response.status_code] += 1
                if response.status_code == 200:
                    results.append(seconds)
                elif response.status_code == 429:
                    time.sleep(0.05)


def batch_sizes(metrics: str) -> dict[str, int]:
    """Images per forward pass: the histogram's buckets, de-cumulated."""
    buckets = [(b, int(n)) for b, n in re.findall(r'lcm_batch_size_bucket\{le="([^"]+)"\} (\d+)', metrics)]
    out, previous = {}, 0
    for bound, n in buckets:
        if n - previous:
            out[f"<={bound}"] = n - previous
        previous = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/distill/lcm")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--max-queue", type=int, default=32, help="the server's queue bound (fewer than --clients: some 429s)")
    parser.add_argument("--out", default="runs/serve-load")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "latent_consistency.cli", "serve", "--model", args.model, "--port", str(port),
                               "--device", "cpu", "--max-queue", str(args.max_queue)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {server.stderr.read()}") from None
                time.sleep(0.2)
        results, codes, lock = [], Counter(), threading.Lock()
        start = time.monotonic()
        stop_at = start + args.warmup + args.seconds
        threads = [threading.Thread(target=client, args=(url, stop_at, i, results, codes, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.warmup)
        with lock:
            warm_count, warm_codes = len(results), Counter(codes)
        rss_warm, warm_time = rss_mib(server.pid), time.monotonic()
        rss_samples = []
        while time.monotonic() < stop_at:
            time.sleep(1)
            rss_samples.append(rss_mib(server.pid))
        for t in threads:
            t.join()
        measured = results[warm_count:]
        elapsed = time.monotonic() - warm_time
        rss_end = rss_mib(server.pid)
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        server.terminate()
        server.wait(30)

    latencies = sorted(measured)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "model": args.model, "clients": args.clients, "max_queue": args.max_queue, "seconds": args.seconds, "warmup_seconds": args.warmup,
        "status_codes": dict(codes - warm_codes), "status_codes_warmup": dict(warm_codes),
        "images": len(measured), "images_per_s": len(measured) / elapsed,
        "latency_p50_ms": 1e3 * statistics.median(latencies), "latency_p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))],
        "rss_after_warmup_mib": rss_warm, "rss_end_mib": rss_end, "rss_max_mib": max(rss_samples),
        "rss_growth": rss_end / rss_warm - 1, "batch_sizes": batch_sizes(metrics),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
