"""`lcm serve` after its review: a full queue refuses before decoding an upload, a 500 keeps the connection usable, the
413 names the upload limit, `--root-path`, `--max-side` on the model's grid, integer bounds in /openapi.json, one message
for a prompt that is not Unicode text, and the page (status line in view, stacked columns on a phone, its notes)."""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading

import pytest
import torch
from PIL import Image

from test_serve import ServerThread, free_port, make_app, started_server, wait_until
from test_serve_page import CHROMIUM, Browser


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


def png_base64(size=(20, 12)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class GatedGenerator:
    """The tiny LCM, held at a gate before each batch."""

    def __init__(self, generator):
        self.generator, self.entered, self.gate = generator, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait()
        return self.generator(*args, **kwargs)


@pytest.fixture
def prepared(monkeypatch):
    """Calls of `prepare` (which decodes an upload) by whether they had an init image; those with one wait for `gate`."""
    import latent_consistency.serve.app as app_module

    calls, gate, original = [], threading.Event(), app_module.prepare

    def counted(body, *args):
        calls.append(body.init_image is not None)
        if body.init_image is not None:
            assert gate.wait(30)
        return original(body, *args)

    monkeypatch.setattr(app_module, "prepare", counted)
    return calls, gate


def post(url: str, body: dict, timeout: float = 30):
    import httpx

    return httpx.post(f"{url}/v1/images", json=body, timeout=timeout)


# --- the queue: a place held from admission ---

def test_a_full_queue_refuses_an_upload_at_once_without_decoding_it(generator, prepared):
    """Was: the upload was decoded (seconds for a large one), then refused with 429, and again at each retry."""
    calls, gate = prepared
    gate.set()
    gated = GatedGenerator(generator)
    app = make_app(gated, max_queue=1)
    with ServerThread(app) as url:
        running = threading.Thread(target=post, args=(url, {"prompt": "running", "steps": 1}))
        running.start()
        assert gated.entered.wait(30)  # the worker holds it: the queue is empty
        queued = threading.Thread(target=post, args=(url, {"prompt": "queued", "steps": 1}))
        queued.start()
        wait_until(lambda: len(app.state.batcher.queue) == 1)  # the queue is full
        refused = post(url, {"prompt": "from an image", "steps": 1, "init_image": png_base64()})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "requests are waiting" in refused.json()["error"]
        assert True not in calls  # its upload was never decoded
        gated.gate.set()
        running.join(30)
        queued.join(30)


def test_requests_being_decoded_count_against_max_queue(generator, prepared):
    """Was: requests waiting to be decoded were not counted, so any number of them (each holding its body) piled up."""
    calls, gate = prepared
    app = make_app(generator, max_queue=1)
    answers = []
    with ServerThread(app) as url:
        decoding = threading.Thread(target=lambda: answers.append(post(url, {"prompt": "from an image", "steps": 1,
                                                                              "init_image": png_base64()})))
        decoding.start()
        wait_until(lambda: calls == [True])  # held in its decode: its place is taken
        refused = post(url, {"prompt": "text", "steps": 1})
        assert refused.status_code == 429
        gate.set()
        decoding.join(30)
        assert answers[0].status_code == 200
        assert post(url, {"prompt": "text", "steps": 1}).status_code == 200  # the place was given back
    assert app.state.batcher.held == 0


def test_a_request_refused_or_gone_gives_its_place_back(generator):
    from fastapi.testclient import TestClient

    app = make_app(generator, max_queue=1)
    with TestClient(app) as client:
        for _ in range(3):
            assert client.post("/v1/images", json={"prompt": "x", "steps": 1, "init_image": "not base64!"}).status_code == 422
        assert app.state.batcher.held == 0
        assert client.post("/v1/images", json={"prompt": "x", "steps": 1}).status_code == 200


# --- a 500 ---

def read_response(sock) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response (head, body) with a Content-Length from `sock`; AssertionError if the server closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the body"
        body += chunk
    return head, body


def test_a_500_keeps_the_connection_usable_and_logs_its_traceback(generator, monkeypatch, caplog):
    """Was: the exception went on to uvicorn, which closed the connection after a 500 that did not say so: a client's pool
    sent its next request on it and got a ReadError."""
    original = type(generator).__call__
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the device fell over")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(generator), "__call__", fails_once)
    app = make_app(generator)
    body = b'{"prompt": "a red star", "steps": 1}'
    with ServerThread(app) as url, socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as sock:
        sock.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head, answer = read_response(sock)
        assert head.startswith(b"HTTP/1.1 500") and b"connection: close" not in head.lower()
        assert answer == b'{"error":"internal error (RuntimeError); the server\'s log has the details"}'
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
        head, answer = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer
    failures = [r for r in caplog.records if r.name == "latent_consistency.serve" and r.levelno == logging.ERROR]
    assert len(failures) == 1 and "POST /v1/images" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], RuntimeError)
    assert app.state.metrics.responses[500] == 1


# --- answers: 413, /openapi.json, text that is not Unicode ---

def test_a_body_over_the_limit_names_the_init_image_and_its_limit(generator):
    from fastapi.testclient import TestClient

    with TestClient(make_app(generator)) as client:  # make_app: a 2 MiB body, a 1 MiB upload
        response = client.post("/v1/images", content=b'{"prompt": "x", "init_image": "' + b"A" * (3 * 2**20) + b'"}',
                               headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"error": "request body is over 2 MiB (an init_image may be at most 1 MiB on this server)"}


def test_openapi_gives_integer_bounds_as_integers(generator):
    """Was: FastAPI wrote them as floats, the seed's maximum 2^63 (9.223372036854776e+18), which the server refuses."""
    from fastapi.testclient import TestClient

    from latent_consistency.pipelines import MAX_SEED

    with TestClient(make_app(generator)) as client:
        fields = client.get("/openapi.json").json()["components"]["schemas"]["ImageRequest"]["properties"]
    seed = next(option for option in fields["seed"]["anyOf"] if option.get("type") == "integer")
    assert seed["maximum"] == MAX_SEED and type(seed["maximum"]) is int and type(seed["minimum"]) is int
    assert fields["steps"]["maximum"] == 8 and type(fields["steps"]["maximum"]) is int


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_text_that_is_not_unicode_gets_one_message_in_either_prompt(generator, field):
    """Was: a lone surrogate in `prompt` got pydantic's "unable to parse raw data as a unicode string"."""
    from fastapi.testclient import TestClient

    body = {"prompt": '"a red star"', field: '"a \\udc80"'}
    text = "{" + ", ".join(f'"{key}": {value}' for key, value in body.items()) + ', "steps": 1}'
    with TestClient(make_app(generator)) as client:
        response = client.post("/v1/images", content=text.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": f"{field}: not Unicode text (byte 0x80 at character 3)"}


# --- the command line ---

def test_max_side_off_the_models_grid_is_refused(tiny_lcm, generator, run_error):
    """Was: accepted, and published in /v1/config as a size every request for it was refused."""
    from latent_consistency.cli import build_parser
    from latent_consistency.cli.serve import build_app
    from latent_consistency.errors import UserError

    grid = generator.model.codec.downsampling_factor * generator.model.patch_size
    off = generator.default_size() + 1
    assert off % grid
    args = build_parser().parse_args(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--max-side", str(off)])
    with pytest.raises(UserError, match=f"--max-side {off} is not a multiple of the model's grid {grid}: give {off - off % grid}"):
        build_app(args)
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--port", str(free_port()), "--max-side", str(off)])
    assert code == 2 and err.count("\n") == 0 and "grid" in err


def test_root_path_must_be_a_path(run_error, tiny_lcm):
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--root-path", "lcm"])
    assert code == 2 and err.count("\n") == 0 and "leading slash" in err


@pytest.mark.slow
def test_root_path_serves_behind_a_proxy_that_strips_it(tiny_lcm):
    """`lcm serve --root-path /lcm` behind a proxy that passes https://host/lcm/... on as /...: the page and the API answer,
    /openapi.json names the prefix as its server, and a 404 names the path as the client sent it."""
    import httpx

    process, port = started_server(tiny_lcm, args=("--root-path", "/lcm/"))
    try:
        url = f"http://127.0.0.1:{port}"
        assert 'id="prompt"' in httpx.get(f"{url}/").text
        assert httpx.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/lcm"}]
        assert post(url, {"prompt": "a red star", "steps": 1}, timeout=60).status_code == 200
        answer = httpx.post(f"{url}/v1/images/", json={"prompt": "x"})
        assert answer.status_code == 404 and "/lcm/v1/images, without the trailing slash" in answer.json()["error"]
    finally:
        process.terminate()
        process.wait(30)


# --- the page ---

def test_page_has_its_icon_and_notes(generator):
    """Static: no favicon request (a 404 in the console at every load), and the notes the page shows."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(generator)) as client:
        page = client.get("/").text
    assert '<link rel="icon" href="data:,">' in page
    assert 'response.headers.get("X-Negative-Prompt-Truncated")' in page and "preview_decoder" in page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_page_shows_its_status_on_a_laptop_and_a_phone_and_checks_an_upload(generator):
    """On a laptop-height window (1366x507 inside a 1366x650 one) an error is in view and the image fits; on a phone the
    columns stack, the image is wide and the status line stays in view; the notes for a cut negative prompt and a preview
    decoder; an upload over the server's limit refused before it is sent. Was: the status below a 512 px image, off-screen;
    two columns on a phone with an 85 px image."""
    app = make_app(generator)
    with ServerThread(app) as url:
        browser = Browser(url + "/")
        try:
            wait_until(lambda: browser.js("location.href.startsWith('http') && document.readyState") == "complete", 60)
            wait_until(lambda: browser.js("document.getElementById('guidance-value')?.textContent") == "8", 60)
            rect = "(id) => document.getElementById(id).getBoundingClientRect().toJSON()"
            for width, height, mobile in ((1366, 507, False), (375, 700, True)):
                browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=mobile)
                browser.js("window.scrollTo(0, 0); document.getElementById('prompt').value = 'x'.repeat(1001);"
                           "document.getElementById('prompt').dispatchEvent(new Event('input'))")
                wait_until(lambda: "limit is 1000" in browser.js("document.getElementById('status').textContent"), 60)
                status = browser.js(f"({rect})('status')")
                assert status["top"] >= 0 and status["bottom"] <= browser.js("innerHeight"), (width, status)
                image, controls = browser.js(f"({rect})('image')"), browser.js(f"({rect})('controls')")
                if mobile:
                    assert image["top"] >= controls["bottom"] and image["width"] >= 300
                else:
                    assert image["left"] >= controls["right"] and image["bottom"] <= browser.js("innerHeight")
            notes = browser.js('notes(new Response("", {headers: {"X-Negative-Prompt-Truncated": "42 tokens, the text encoder reads 20"}}))')
            assert notes == "The negative prompt's end was not read (42 tokens, the text encoder reads 20)."
            assert browser.js("document.getElementById('decoder').hidden") is True
            browser.js("applyConfig({...config, preview_decoder: 'pd'})")
            assert "preview decoder pd: approximate" in browser.js("document.getElementById('decoder').textContent")
            assert browser.js("document.getElementById('decoder').hidden") is False
            sent = app.state.metrics.responses.total()
            browser.js("config.max_upload_bytes = 2 ** 20; const files = new DataTransfer();"
                       "files.items.add(new File([new Uint8Array(3 * 2 ** 20)], 'big.png', {type: 'image/png'}));"
                       "document.getElementById('upload').files = files.files;"
                       "document.getElementById('upload').dispatchEvent(new Event('change'))")
            wait_until(lambda: "choose a smaller one" in browser.js("document.getElementById('status').textContent"), 30)
            assert "The image is 3 MiB" in browser.js("document.getElementById('status').textContent")
            assert browser.js("document.getElementById('img2img').checked") is False
            assert app.state.metrics.responses.total() == sent  # nothing was sent
            # was: a photo over the limit was refused (a phone's is 3-12 MiB); now shrunk here to the server's largest side
            # and drawn from, with a note beside its images. A 1200x900 PNG of noise (3 MiB)
            browser.js("document.getElementById('prompt').value = 'a red star'")
            size = browser.js("""new Promise((resolve) => {
                const canvas = document.createElement('canvas'), context = canvas.getContext('2d');
                canvas.width = 1200; canvas.height = 900;
                const pixels = context.createImageData(1200, 900);
                for (let i = 0; i < pixels.data.length; i += 65536) crypto.getRandomValues(pixels.data.subarray(i, i + 65536));
                for (let i = 3; i < pixels.data.length; i += 4) pixels.data[i] = 255;
                context.putImageData(pixels, 0, 0);
                canvas.toBlob((blob) => {
                  const files = new DataTransfer();
                  files.items.add(new File([blob], 'photo.png', {type: 'image/png'}));
                  document.getElementById('upload').files = files.files;
                  document.getElementById('upload').dispatchEvent(new Event('change'));
                  resolve(blob.size);
                }, 'image/png');
            })""")
            assert size > 2**20
            side = 2 * generator.default_size()  # `make_app`'s max_side
            shrunk = f"over the 1 MiB this server takes: shrunk here to {side}x{side * 3 // 4} px."
            wait_until(lambda: shrunk in browser.js("document.getElementById('status').textContent"), 60)
            assert browser.js("document.getElementById('img2img').checked") is True
            assert app.state.metrics.responses.get(200, 0) > 0 and 413 not in app.state.metrics.responses
        finally:
            browser.close()
