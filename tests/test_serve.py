"""`lcm serve`: the batcher, the API's answers (images equal to the library's, 4xx for every bad request, 429 when full,
batching, cancellation, metrics) and the command line."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.serve.batcher import Batcher, QueueFull


class Job:
    def __init__(self, key, value=0):
        self.key, self.value = key, value


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


# --- the batcher ---

def test_batcher_runs_queued_jobs_with_one_key_as_one_batch_and_keeps_order():
    gate, batches = threading.Event(), []

    def run(jobs):
        gate.wait()
        batches.append([(j.key, j.value) for j in jobs])
        return [j.value * 10 for j in jobs]

    batcher = Batcher(run, max_batch=3, max_queue=16, max_wait_s=0.0)
    batcher.start()
    try:
        first = batcher.submit(Job("a", 0))
        wait_until(lambda: not batcher.queue)  # the worker holds job 0
        futures = [batcher.submit(Job(key, i)) for i, key in enumerate("aabaab", start=1)]
        gate.set()
        assert [f.result(5) for f in [first, *futures]] == [0, 10, 20, 30, 40, 50, 60]
    finally:
        batcher.stop()
    # job 0 alone; then the oldest key "a" with up to 3 of its jobs; then "b" (jobs 3 and 6); then the last "a"
    assert batches == [[("a", 0)], [("a", 1), ("a", 2), ("a", 4)], [("b", 3), ("b", 6)], [("a", 5)]]
    assert "lcm_images_total 7" in batcher.metrics.exposition()


def test_batcher_refuses_when_full_and_never_runs_cancelled_jobs():
    gate, ran = threading.Event(), []

    def run(jobs):
        gate.wait()
        ran.extend(j.value for j in jobs)
        return [None] * len(jobs)

    batcher = Batcher(run, max_batch=8, max_queue=2, max_wait_s=0.0)
    batcher.start()
    try:
        batcher.submit(Job("a", 0))
        wait_until(lambda: not batcher.queue)
        waiting = [batcher.submit(Job("a", 1)), batcher.submit(Job("a", 2))]
        with pytest.raises(QueueFull):
            batcher.submit(Job("a", 3))
        assert waiting[0].cancel()  # the client went away: its place is free again
        last = batcher.submit(Job("a", 4))
        gate.set()
        last.result(5)
        waiting[1].result(5)
    finally:
        batcher.stop()
    assert sorted(ran) == [0, 2, 4]


def test_batcher_worker_survives_a_failing_batch():
    def run(jobs):
        if jobs[0].value < 0:
            raise ValueError("bad job")
        return [j.value for j in jobs]

    batcher = Batcher(run, max_wait_s=0.0)
    batcher.start()
    try:
        with pytest.raises(ValueError, match="bad job"):
            batcher.submit(Job("a", -1)).result(5)
        assert batcher.submit(Job("a", 7)).result(5) == 7
    finally:
        batcher.stop()


def test_a_failing_job_fails_alone_and_not_the_batch_it_was_in():
    gate, batches = threading.Event(), []

    def run(jobs):
        gate.wait()
        batches.append([j.value for j in jobs])
        if any(j.value < 0 for j in jobs):
            raise ValueError("bad job")
        return [j.value for j in jobs]

    batcher = Batcher(run, max_batch=8, max_wait_s=0.0)
    batcher.start()
    try:
        batcher.submit(Job("a", 0))
        wait_until(lambda: not batcher.queue)  # the worker holds job 0: the next three queue up as one batch
        futures = [batcher.submit(Job("a", value)) for value in (1, -1, 2)]
        gate.set()
        assert futures[0].result(5) == 1 and futures[2].result(5) == 2
        with pytest.raises(ValueError, match="bad job"):
            futures[1].result(5)
    finally:
        batcher.stop()
    assert batches == [[0], [1, -1, 2], [1], [-1], [2]]  # the batch failed, then ran one job at a time


# --- the API on a tiny LCM ---

@pytest.fixture(scope="module")
def generator(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


def make_app(generator, **settings):
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    return create_app(generator, Limits(max_side=2 * generator.default_size(), max_upload_bytes=2**20, max_body_bytes=2 * 2**20),
                      model_name="tiny", **settings)


@pytest.fixture(scope="module")
def client(generator):
    from fastapi.testclient import TestClient

    with TestClient(make_app(generator)) as c:
        yield c


def test_an_unexpected_failure_is_a_one_line_json_500_and_the_server_keeps_serving(generator, monkeypatch):
    """No client's mistake (here the model raising): a JSON error like every other (Starlette then raises the exception on,
    for the server to log; this test client does not re-raise it), and the next request served."""
    from fastapi.testclient import TestClient

    calls = []
    original = type(generator).__call__

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the device fell over")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(generator), "__call__", fails_once)
    with TestClient(make_app(generator), raise_server_exceptions=False) as c:
        failed = c.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1})
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal error (RuntimeError); the server's log has the details"}
        assert c.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1}).status_code == 200


def png_base64(size=(20, 12)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def library_image(generator, prompt, seed, steps, guidance_scale, size=None) -> np.ndarray:
    from latent_consistency.grids import to_pil

    size = size or generator.default_size()
    images = generator([prompt], generator.timesteps(steps), guidance_scale, [seed], size, size)
    return np.asarray(to_pil(images)[0])


def test_image_equals_the_library_sampler(client, generator):
    response = client.post("/v1/images", json={"prompt": "a red star", "seed": 5, "steps": 2, "guidance_scale": 3.0})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "5" and float(response.headers["x-latency-ms"]) > 0
    np.testing.assert_array_equal(decoded(response.content), library_image(generator, "a red star", 5, 2, 3.0))
    # a different seed, steps or size gives another image; JPEG comes back as JPEG
    other = client.post("/v1/images", json={"prompt": "a red star", "seed": 6, "steps": 2, "guidance_scale": 3.0})
    assert not np.array_equal(decoded(other.content), decoded(response.content))
    size = 2 * generator.default_size()
    wide = client.post("/v1/images", json={"prompt": "a red star", "width": size, "format": "jpeg"})
    assert wide.headers["content-type"] == "image/jpeg" and decoded(wide.content).shape == (generator.default_size(), size, 3)


@pytest.mark.parametrize("options", [{"gamma": 0.3}, {"negative_prompt": "a blue ring", "negative_scale": 0.5},
                                     {"init_image": "png", "strength": 0.5}], ids=["tcd", "negative", "img2img"])
def test_sampling_options_equal_the_library(client, generator, options):
    from latent_consistency.grids import to_pil
    from latent_consistency.serve.request import Limits, decode_image, resized_pixels

    size = generator.default_size()
    body = {"prompt": "a red star", "seed": 2, "steps": 2, "guidance_scale": 3.0} | options
    kwargs = {k: v for k, v in options.items() if k in ("gamma", "negative_scale", "strength")}
    if "negative_prompt" in options:
        kwargs["negative_prompts"] = [options["negative_prompt"]]
    if "init_image" in options:
        body |= {"init_image": png_base64(), "width": size, "height": size}  # resized to them (else 20 x 12, its own size)
        kwargs["init_images"] = resized_pixels(decode_image(body["init_image"], Limits(max_side=size)), size, size)[None]
    response = client.post("/v1/images", json=body)
    assert response.status_code == 200, response.text
    timesteps = generator.timesteps(2, strength=kwargs.get("strength", 1.0))
    expected = np.asarray(to_pil(generator(["a red star"], timesteps, 3.0, [2], size, size, **kwargs))[0])
    np.testing.assert_array_equal(decoded(response.content), expected)
    assert not np.array_equal(expected, library_image(generator, "a red star", 2, 2, 3.0))  # the option did something


def test_requests_that_arrive_together_share_a_forward_pass(generator):
    from fastapi.testclient import TestClient

    prompts = ["a red star", "a blue ring", "a green square", "a white circle"]
    with TestClient(make_app(generator, max_wait_s=1.0)) as c, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: c.post("/v1/images", json={"prompt": prompts[i], "seed": i, "steps": 2}), range(4)))
        metrics = c.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * 4
    assert {r.headers["x-batch-size"] for r in responses} == {"4"}
    assert 'lcm_batch_size_bucket{le="2"} 0' in metrics and 'lcm_batch_size_bucket{le="4"} 1' in metrics
    # an image does not depend on the batch it was made in
    for i, r in enumerate(responses):
        np.testing.assert_allclose(decoded(r.content), library_image(generator, prompts[i], i, 2, 8.0), atol=1)


BAD_REQUESTS = {
    "malformed JSON": (b'{"prompt": "a red', 422, "not valid JSON"),
    "not an object": (b'["a red star"]', 422, "body"),
    "no prompt": (b'{"steps": 4}', 422, "prompt"),
    "blank prompt": (b'{"prompt": "   "}', 422, "blank"),
    "unknown field": (b'{"prompt": "x", "stepz": 4}', 422, "stepz"),
    "0 steps": (b'{"prompt": "x", "steps": 0}', 422, "steps"),
    "100 steps": (b'{"prompt": "x", "steps": 100}', 422, "steps"),
    "steps as text": (b'{"prompt": "x", "steps": "many"}', 422, "steps"),
    "NaN guidance": (b'{"prompt": "x", "guidance_scale": NaN}', 422, "guidance_scale"),
    "infinite guidance": (b'{"prompt": "x", "guidance_scale": 1e999}', 422, "guidance_scale"),
    "guidance below 1 for an omega input": (b'{"prompt": "x", "guidance_scale": 0.5}', 422, "below 1"),
    "huge guidance": (b'{"prompt": "x", "guidance_scale": 1000}', 422, "above"),
    "huge size": (b'{"prompt": "x", "width": 100000, "height": 100000}', 422, "limit"),
    "size off the VAE grid": (b'{"prompt": "x", "width": 13}', 422, "multiple"),
    "negative seed": (b'{"prompt": "x", "seed": -1}', 422, "seed"),
    "gamma above 1": (b'{"prompt": "x", "gamma": 2}', 422, "gamma"),
    "strength 0": (b'{"prompt": "x", "strength": 0}', 422, "strength"),
    "strength leaving too few steps": (b'{"prompt": "x", "steps": 4, "strength": 0.05, "init_image": "' + png_base64().encode() + b'"}', 422,
                                       "strength"),
    "negative scale NaN": (b'{"prompt": "x", "negative_prompt": "y", "negative_scale": NaN}', 422, "negative_scale"),
    "negative scale without a negative prompt": (b'{"prompt": "x", "negative_scale": 0.5}', 422, "negative_scale applies"),
    "strength without an init image": (b'{"prompt": "x", "strength": 0.5}', 422, "strength applies"),
    "prompt not Unicode": (b'{"prompt": "\\udc80"}', 422, "prompt"),
    "negative prompt not Unicode": (b'{"prompt": "x", "negative_prompt": "a \\udc80"}', 422, "negative_prompt: not Unicode"),
    "unknown format": (b'{"prompt": "x", "format": "gif"}', 422, "format"),
    "init image not base64": (b'{"prompt": "x", "init_image": "%%%"}', 422, "base64"),
    "init image not an image": (b'{"prompt": "x", "init_image": "' + base64.b64encode(b"hello, not a picture") + b'"}', 422,
                                "cannot read init_image: not an image file"),
    "prompt over the length limit": (b'{"prompt": "' + b"x" * 5000 + b'"}', 422, "characters"),
    "10 MB prompt": (b'{"prompt": "' + b"x" * (10 * 2**20) + b'"}', 413, "over"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_message(client, name):
    body, status, words = BAD_REQUESTS[name]
    response = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["error"] and "\n" not in response.json()["error"]
    assert "--" not in response.json()["error"]  # the API's fields, not the command line's flags


def test_upload_over_the_limit_is_refused_and_the_server_keeps_serving(client):
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # ~1.4 MB as PNG: over the 1 MiB upload limit
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    response = client.post("/v1/images", json={"prompt": "x", "init_image": base64.b64encode(buffer.getvalue()).decode()})
    assert response.status_code == 422 and "larger than" in response.json()["error"]
    assert client.post("/v1/images", json={"prompt": "a red star", "steps": 1}).status_code == 200


def test_health_config_metrics_page_and_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    config = client.get("/v1/config").json()
    assert config["kind"] == "lcm" and config["max_steps"] == 8 and config["default_guidance_scale"] == 8.0
    client.post("/v1/images", json={"prompt": "x", "steps": 0})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for series in ('lcm_requests_total{code="422"}', "lcm_request_seconds_count", "lcm_queue_depth 0", "lcm_batch_size_bucket", "lcm_images_total"):
        assert series in metrics.text
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "http" not in page.text.split("<script>")[0].replace("http-equiv", "")
    schema = client.get("/openapi.json").json()
    assert "/v1/images" in schema["paths"] and "ImageRequest" in schema["components"]["schemas"]


def test_a_bad_request_fails_alone_and_not_the_request_it_arrived_with(generator):
    from fastapi.testclient import TestClient

    bodies = [b'{"prompt": "a red star", "negative_prompt": "\\udc80", "steps": 1}',
              b'{"prompt": "a red star", "negative_prompt": "a blue ring", "steps": 1}']
    with TestClient(make_app(generator, max_wait_s=1.0)) as c, ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(lambda body: c.post("/v1/images", content=body, headers={"content-type": "application/json"}), bodies)
    assert bad.status_code == 422 and "negative_prompt" in bad.json()["error"]
    assert good.status_code == 200 and good.content.startswith(b"\x89PNG")


# --- a real server: disconnects, and the command line ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class GatedGenerator:
    """The tiny LCM, held at a gate before each batch, counting the prompts it ran."""

    def __init__(self, generator):
        self.generator, self.entered, self.gate, self.prompts = generator, threading.Event(), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def __call__(self, prompts, *args, **kwargs):
        self.entered.set()
        self.gate.wait()
        self.prompts += prompts
        return self.generator(prompts, *args, **kwargs)


def test_a_client_that_disconnects_while_waiting_costs_nothing(generator):
    import httpx

    gated = GatedGenerator(generator)
    app = make_app(gated)
    with ServerThread(app) as url:
        holder = threading.Thread(target=lambda: httpx.post(f"{url}/v1/images", json={"prompt": "first", "steps": 1}, timeout=30))
        holder.start()
        assert gated.entered.wait(30)  # the worker holds "first" at the gate
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images", json={"prompt": "gone", "steps": 1}, timeout=0.5)
        wait_until(lambda: app.state.metrics.cancelled == 1)
        assert app.state.metrics.queue_depth == 0  # the gone client's job left the gauge with it, not at the next pickup
        gated.gate.set()
        holder.join(30)
        assert httpx.post(f"{url}/v1/images", json={"prompt": "after", "steps": 1}, timeout=30).status_code == 200
    assert gated.prompts == ["first", "after"]


def test_serve_command_errors_exit_2(run_error, tmp_path):
    code, err = run_error(["serve", "--model", str(tmp_path / "missing")])
    assert code == 2 and err.count("\n") == 0
    code, err = run_error(["serve", "--model", str(tmp_path), "--port", "70000"])
    assert code == 2 and "port" in err


@pytest.mark.parametrize("where", ["port in use", "unknown host"])
def test_serve_command_that_cannot_listen_says_so_in_one_line(where, tiny_lcm, capsys):
    from latent_consistency.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = ["--port", str(taken.getsockname()[1])] if where == "port in use" else ["--host", "host.invalid"]
        assert main(["serve", "--model", str(tiny_lcm), "--device", "cpu", *address]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("lcm serve: error: cannot listen on") and err.count("\n") == 1, err
    assert "http://" not in out  # never said it was serving


def started_server(model, env: dict | None = None, args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, int]:
    """`lcm serve --model MODEL [ARGS]` in a process of its own on a free port, once it answers /health: (process, port).
    The caller ends the process."""
    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "latent_consistency.cli", "serve", "--model", str(model), "--port", str(port),
                                "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def up():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            assert process.poll() is None, process.stderr.read()
            return False

    try:
        wait_until(up, timeout=120)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process, port


@pytest.mark.slow
def test_serve_command_starts_on_localhost_and_answers(tiny_lcm):
    import httpx

    process, port = started_server(tiny_lcm)
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/images", json={"prompt": "a red star", "seed": 1}, timeout=60)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
    finally:
        process.terminate()
        process.wait(30)
