"""One process used for a long time: `lcm serve` after many requests (bounded cache, queue, threads and descriptors;
/metrics adding up), clients that leave before their image is made (no model work for them), and `LCMGenerator` called
again and again in one notebook-like loop (the prompt cache bounded, ∅ encoded once)."""

from __future__ import annotations

import os
import threading

import httpx
import pytest
import torch

from latent_consistency.pipelines import LCMGenerator
from latent_consistency.prompts import PromptCache
from test_prompt_cache import CountingEncoder
from test_serve import GatedGenerator, ServerThread, make_app, wait_until

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    return LCMGenerator.load(str(tiny_lcm), CPU, torch.float32)


@pytest.fixture(scope="module")
def tiny_pixart_lcm(tmp_path_factory):
    from tiny_models import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-lcm", seed=1, lcm=True)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def metric(exposition: str, name: str) -> float:
    return float(next(line.split()[-1] for line in exposition.splitlines() if line.startswith(name + " ")))


def test_many_requests_leave_the_cache_queue_threads_and_descriptors_bounded_and_the_metrics_add_up(generator):
    """A server answering a stream of distinct prompts at mixed sizes, steps and formats: the prompt cache never holds
    more than its capacity, nothing stays queued, no thread or file descriptor is left behind per request, and /metrics
    counts every request, image and batch."""
    from fastapi.testclient import TestClient

    generator.prompt_cache = PromptCache(capacity=8)
    size, n = generator.default_size(), 48
    app = make_app(generator)
    with TestClient(app) as client:
        def post(i):
            body = {"prompt": f"prompt {i}", "seed": i, "steps": 1 + i % 3, "width": size * (1 + i % 2),
                    "format": ("png", "jpeg")[i % 2]}
            assert client.post("/v1/images", json=body).status_code == 200

        for i in range(8):  # warm: the thread pools and lazy imports are there before counting
            post(i)
        threads, descriptors = threading.active_count(), open_descriptors()
        for i in range(8, n):
            post(i)
            assert len(generator.prompt_cache.rows) <= 8
        assert threading.active_count() <= threads and open_descriptors() <= descriptors
        assert not app.state.batcher.queue
        exposition = client.get("/metrics").text
    assert f'lcm_requests_total{{code="200"}} {n}' in exposition
    assert metric(exposition, "lcm_images_total") == n and metric(exposition, "lcm_batch_size_sum") == n
    assert metric(exposition, "lcm_request_seconds_count") == n and metric(exposition, "lcm_queue_depth") == 0


def test_a_client_that_leaves_while_its_request_is_prepared_has_no_image_made(generator, monkeypatch):
    """A request is checked (an upload decoded) in a thread before it queues; a client that leaves meanwhile used to be
    queued anyway, and an idle worker took it before the next disconnect poll: the model made an image for no one."""
    import latent_consistency.serve.app as app_module

    release, preparing = threading.Event(), threading.Event()
    prepare = app_module.prepare

    def slow_prepare(*args, **kwargs):
        preparing.set()
        release.wait(30)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(app_module, "prepare", slow_prepare)
    monkeypatch.setattr(app_module, "DISCONNECT_POLL_S", 5.0)  # the worker, not the poll, would see the job first
    gated = GatedGenerator(generator)
    gated.gate.set()
    app = make_app(gated)
    server = ServerThread(app)
    with server as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images", json={"prompt": "gone", "steps": 1}, timeout=0.5)
        assert preparing.wait(30)
        wait_until(lambda: not server.server.server_state.connections)  # uvicorn saw the client go
        release.set()
        wait_until(lambda: app.state.metrics.cancelled == 1)
        monkeypatch.setattr(app_module, "prepare", prepare)
        assert httpx.post(f"{url}/v1/images", json={"prompt": "after", "steps": 1}, timeout=30).status_code == 200
    assert gated.prompts == ["after"]


def test_uploads_of_clients_that_left_are_not_decoded_after_the_one_being_decoded(generator, monkeypatch):
    """Uploads are decoded a few at a time; the page aborts its request at each keystroke. Requests waiting for their turn
    to decode used to be decoded (and queued) though their clients had left, so the one request still wanted waited
    behind all of them. Now a request whose client left is dropped when its turn comes."""
    import latent_consistency.serve.app as app_module
    from test_serve import png_base64

    release, decoded = threading.Event(), []
    prepare = app_module.prepare

    def slow_prepare(body, *args, **kwargs):
        decoded.append(body.prompt)
        release.wait(30)
        return prepare(body, *args, **kwargs)

    monkeypatch.setattr(app_module, "prepare", slow_prepare)
    monkeypatch.setattr(app_module, "MAX_DECODING", 1)
    app = make_app(generator)
    server = ServerThread(app)
    upload = {"steps": 1, "init_image": png_base64(), "strength": 0.5}
    with server as url:
        first = threading.Thread(target=lambda: httpx.post(f"{url}/v1/images", json={"prompt": "first", **upload}, timeout=30))
        first.start()
        wait_until(lambda: decoded == ["first"])
        for i in range(3):  # typed on while "first" decodes, each request aborted by the next
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/images", json={"prompt": f"typed {i}", **upload}, timeout=0.3)
        wait_until(lambda: len(server.server.server_state.connections) == 1)  # uvicorn saw them go
        release.set()
        first.join(30)
        wait_until(lambda: app.state.metrics.cancelled == 3)
    assert decoded == ["first"]


def test_prompt_cache_holds_at_most_its_capacity_with_the_empty_prompt_counted():
    """∅ is a row like any prompt's: a cache of capacity 1 used to hold a prompt and ∅, two rows."""
    encoder, cache = CountingEncoder(), PromptCache(capacity=1)
    cache.encode(encoder, ["a"], CPU, (32, 32))
    uncond = cache.uncond(encoder, CPU, (32, 32))
    assert len(cache.rows) == 1 and torch.equal(uncond, encoder.uncond(CPU, (32, 32)))


def test_a_notebook_loop_of_new_prompts_keeps_the_generators_cache_bounded(generator):
    """200 calls, each with new prompts (and a negative prompt now and then), at two sizes: the cache stays at its
    capacity, and a prompt seen again after being dropped is encoded again, to the same image."""
    generator.prompt_cache = PromptCache(capacity=16)
    size, timesteps = generator.default_size(), generator.timesteps(1)
    first = generator(["prompt 0"], timesteps, 3.0, [0], size, size)
    for i in range(1, 200):
        generator([f"prompt {i}", f"prompt {i}b"], timesteps, 3.0, [i, i], size, size * (1 + i % 2),
                  negative_prompts=[f"not {i}"] if i % 5 == 0 else None)
        assert len(generator.prompt_cache.rows) <= 16
    encoded = generator.prompt_cache.encoded
    assert torch.equal(generator(["prompt 0"], timesteps, 3.0, [0], size, size), first)
    assert generator.prompt_cache.encoded == encoded + 1


def test_an_lcm_without_an_omega_input_encodes_the_empty_prompt_once_per_size(tiny_pixart_lcm, monkeypatch):
    """A PixArt-LCM (or LCM-LoRA) at g > 1 is classifier-free guided against ∅: the text encoder (T5-XXL for PixArt) ran
    on the empty prompt at every call; now once per size, from the generator's prompt cache, to the same images."""
    from latent_consistency.prompts import T5PromptEncoder

    calls = []
    uncond = T5PromptEncoder.uncond
    monkeypatch.setattr(T5PromptEncoder, "uncond", lambda self, *args, **kwargs: calls.append(1) or uncond(self, *args, **kwargs))
    lcm = LCMGenerator.load(str(tiny_pixart_lcm), CPU, torch.float32)
    assert lcm.kind == "lora"
    size, timesteps = lcm.default_size(), lcm.timesteps(2)
    images = [lcm(["a red star"], timesteps, 1.5, [3], size, size) for _ in range(3)]
    assert len(calls) == 1
    assert all(torch.equal(image, images[0]) for image in images)
    lcm(["a red star"], timesteps, 1.5, [3], size, 2 * size)
    assert len(calls) == 2
