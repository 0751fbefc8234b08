"""`lcm serve` with many requests in flight: each answer equals the request's answer served alone (mixed settings
never share a forward pass), a client leaving at any moment does not stop the worker, the tokenizer is used on the
worker's thread only, a burst past the queue is refused with 429 and counted, and shutdown with requests in flight
serves them and ends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from latent_consistency.serve.batcher import Batcher
from test_serve import GatedGenerator, Job, ServerThread, decoded, make_app, png_base64, wait_until


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


def held_then_released(app, gated: GatedGenerator, client, bodies: list[dict]) -> list:
    """Answers to `bodies` sent at once while the worker is held on a first request, so that all of them are queued
    together when it is released (the first request's answer is not returned)."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        first = pool.submit(client.post, "/v1/images", json={"prompt": "hold", "steps": 1})
        assert gated.entered.wait(30)
        futures = [pool.submit(client.post, "/v1/images", json=body) for body in bodies]
        wait_until(lambda: len(app.state.batcher.queue) == len(bodies))
        gated.gate.set()
        assert first.result().status_code == 200
        return [f.result() for f in futures]


def test_mixed_requests_in_flight_together_each_equal_their_answer_served_alone(generator):
    size = generator.default_size()
    base = {"prompt": "a red star", "seed": 1, "steps": 2}
    bodies = [base, base | {"prompt": "a blue ring", "seed": 2}, base | {"seed": 3, "format": "jpeg"},  # one batch of 3
              base | {"steps": 3}, base | {"guidance_scale": 3.0}, base | {"width": 2 * size}, base | {"gamma": 0.3},
              base | {"negative_prompt": "a blue ring"}, base | {"prompt": "a green square", "negative_prompt": "a red star"},
              base | {"negative_prompt": "a blue ring", "negative_scale": 0.5},
              base | {"init_image": png_base64(), "strength": 0.5}, base | {"init_image": png_base64((8, 30)), "strength": 0.7}]
    with TestClient(make_app(generator)) as c:
        alone = [c.post("/v1/images", json=body) for body in bodies]
    gated = GatedGenerator(generator)
    app = make_app(gated, max_wait_s=1.0)
    with TestClient(app) as c:
        together = held_then_released(app, gated, c, bodies)
    assert [r.status_code for r in alone + together] == [200] * 2 * len(bodies)
    for body, one, many in zip(bodies, alone, together):
        assert many.headers["content-type"] == one.headers["content-type"], body
        np.testing.assert_allclose(decoded(many.content), decoded(one.content), atol=1, err_msg=str(body))  # bit-exact on x86 CPUs
    assert [int(r.headers["x-batch-size"]) for r in together] == [3, 3, 3, 1, 1, 1, 1, 2, 2, 1, 1, 1]


def test_a_client_leaving_as_the_worker_takes_its_job_does_not_stop_the_worker():
    """The app cancels a job from the event loop, outside the batcher's lock: here just after the worker saw it queued.
    The worker died of an IndexError, and every later request waited for ever."""
    batcher = Batcher(lambda jobs: [j.value for j in jobs], max_wait_s=0.0)
    drop_cancelled, leaving, left = batcher._drop_cancelled, [], threading.Event()

    def client_leaves_as_the_worker_looks():
        if leaving and threading.current_thread() is batcher.thread:
            leaving.pop().cancel()
            left.set()
        drop_cancelled()

    batcher._drop_cancelled = client_leaves_as_the_worker_looks
    batcher.start()
    try:
        with batcher.ready:  # the worker looks at the queue once this job is in `leaving`
            leaving.append(batcher.submit(Job("a", 1)))
        assert left.wait(5)
        assert batcher.submit(Job("a", 2)).result(5) == 2
    finally:
        batcher.stop()


def test_the_tokenizer_runs_on_the_workers_thread_only(generator, monkeypatch):
    """A tokenizer keeps truncation and padding as state: the event loop's truncation check for one answer, run while the
    worker encodes the next batch, left the worker's prompts untruncated (CLIP: longer than its positions, a 500;
    T5: another image, cached for that prompt)."""
    tokenizer, threads = generator.model.tokenizer, set()

    class Recording:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return tokenizer(*args, **kwargs)

    monkeypatch.setattr(generator.model, "tokenizer", Recording())
    with TestClient(make_app(generator)) as c:
        long = c.post("/v1/images", json={"prompt": "a red star and a blue ring " * 4 + "new", "steps": 1})
        short = c.post("/v1/images", json={"prompt": "a red", "steps": 1})
    assert long.status_code == short.status_code == 200
    assert "tokens, the text encoder reads 16" in long.headers["x-prompt-truncated"] and "x-prompt-truncated" not in short.headers
    assert threads == {"lcm-batcher"}


def test_a_burst_past_the_queue_is_refused_with_429_and_every_answer_is_counted(generator):
    gated = GatedGenerator(generator)
    app = make_app(gated, max_batch=2, max_queue=3, max_wait_s=0.0)
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(c.post, "/v1/images", json={"prompt": "hold", "steps": 1})
        assert gated.entered.wait(30)
        queued = [pool.submit(c.post, "/v1/images", json={"prompt": f"queued {i}", "seed": i, "steps": 1}) for i in range(3)]
        wait_until(lambda: len(app.state.batcher.queue) == 3)
        refused = [c.post("/v1/images", json={"prompt": "one too many", "steps": 1}) for _ in range(2)]
        assert [r.status_code for r in refused] == [429, 429] and all(r.headers["retry-after"] == "1" for r in refused)
        assert "requests are waiting" in refused[0].json()["error"]
        gated.gate.set()
        answers = [first.result(), *(f.result() for f in queued)]
        metrics = c.get("/metrics").text
    # the held one alone, then the queued three (in the order they arrived) as a batch of max_batch 2 and one of 1
    assert [r.status_code for r in answers] == [200] * 4 and sorted(r.headers["x-batch-size"] for r in answers) == ["1", "1", "2", "2"]
    for series in ('lcm_requests_total{code="200"} 4', 'lcm_requests_total{code="429"} 2', "lcm_images_total 4", "lcm_queue_depth 0",
                   "lcm_batch_size_count 3", "lcm_request_seconds_count 4", "lcm_cancelled_total 0"):
        assert series in metrics.splitlines(), series
    assert gated.prompts[0] == "hold" and sorted(gated.prompts[1:]) == ["queued 0", "queued 1", "queued 2"]


def test_shutdown_with_requests_in_flight_answers_them_and_ends(generator):
    gated = GatedGenerator(generator)
    app = make_app(gated)
    server = ServerThread(app)
    with server as url, ThreadPoolExecutor(3) as pool:
        def post(i):
            return pool.submit(httpx.post, f"{url}/v1/images", json={"prompt": f"in flight {i}", "steps": 1}, timeout=30)

        futures = [post(0)]
        assert gated.entered.wait(30)  # one request runs, two wait in the queue
        futures += [post(1), post(2)]
        wait_until(lambda: len(app.state.batcher.queue) == 2)
        server.server.should_exit = True

        def not_listening():
            try:
                httpx.get(f"{url}/health", timeout=1)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):  # refused, or closed by the shutdown
                return True
            return False

        wait_until(not_listening)  # shutting down, with the three requests in flight
        gated.gate.set()
        assert [f.result().status_code for f in futures] == [200] * 3
        server.thread.join(30)
        assert not server.thread.is_alive() and not app.state.batcher.thread.is_alive()


def test_a_request_queued_when_the_batcher_stops_is_told_the_server_is_shutting_down(generator):
    """A forced stop (a second Ctrl-C) cancels the queued jobs: their clients get 503 and a reason, not a 500."""
    gated = GatedGenerator(generator)
    app = make_app(gated)
    with ServerThread(app) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/images", json={"prompt": "running", "steps": 1}, timeout=30)
        assert gated.entered.wait(30)
        queued = pool.submit(httpx.post, f"{url}/v1/images", json={"prompt": "queued", "steps": 1}, timeout=30)
        wait_until(lambda: len(app.state.batcher.queue) == 1)
        stopping = threading.Thread(target=app.state.batcher.stop)  # waits for the running batch
        stopping.start()
        answer = queued.result()
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]
        gated.gate.set()
        stopping.join(30)
        assert running.result().status_code == 200
