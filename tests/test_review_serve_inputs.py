"""`lcm serve` against inputs a demanding client sends that no other test did: a data: URL cut before its comma or with its
scheme in capitals, an init image in base64 without its padding or in the URL-safe alphabet, a guidance scale a hair past
a limit, one init-image side off the grid, a negative prompt longer than the text encoder reads, a gzip body, a path with
a trailing slash, a client stalled in its upload when the server is stopped, and a code generator reading /openapi.json for
the error shape."""

from __future__ import annotations

import base64
import gzip
import io
import os
import signal
import socket
import threading
import time

import pytest
from PIL import Image

from latent_consistency.serve.app import SHUTTING_DOWN, UPLOAD_GRACE_S
from test_serve import GatedGenerator, free_port, make_app, png_base64, started_server, wait_until

UPLOAD_HEAD = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def image_to_image(api, init_image: str, **fields):
    return api.post("/v1/images", json={"prompt": "a red star", "seed": 3, "steps": 2, "init_image": init_image} | fields)


# defect: "data:image/png;base64" (a data: URL without the comma before its data) was a 500 IndexError, a client's
# mistake counted as a server fault
def test_a_data_url_without_its_comma_is_a_422_saying_so(api):
    response = image_to_image(api, "data:image/png;base64")
    assert response.status_code == 422, response.text
    assert "data: URL" in response.json()["error"]


# defect: a data: URL's scheme is case-insensitive (RFC 2397, RFC 3986 3.1); "DATA:image/png;base64,..." was "not base64"
def test_a_data_url_with_its_scheme_in_capitals_is_read(api):
    response = image_to_image(api, "DATA:image/png;base64," + png_base64((20, 12)))
    assert response.status_code == 200, response.text


def padded_base64_with_both_extra_characters() -> str:
    """A PNG in standard base64 that holds "+", "/" and "=" padding: each differs in the URL-safe, unpadded spellings."""
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 30, 57)).save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    assert text.endswith("=") and "+" in text and "/" in text
    return text


# defect: an init image in base64 without its "=" padding, which many clients strip, or in RFC 4648's URL-safe alphabet
# ("-" and "_" for "+" and "/"), was refused as "init_image is not base64" (b64decode(validate=True))
@pytest.mark.parametrize("spelling", ["unpadded", "URL-safe", "URL-safe unpadded", "URL-safe in a data: URL"])
def test_an_init_image_in_unpadded_or_url_safe_base64_is_read_as_the_padded_one(api, spelling):
    standard = padded_base64_with_both_extra_characters()
    url_safe = standard.replace("+", "-").replace("/", "_")
    text = {"unpadded": standard.rstrip("="), "URL-safe": url_safe, "URL-safe unpadded": url_safe.rstrip("="),
            "URL-safe in a data: URL": "data:image/png;base64," + url_safe.rstrip("=")}[spelling]
    expected = image_to_image(api, standard)
    response = image_to_image(api, text)
    assert response.status_code == 200 and expected.status_code == 200, response.text
    assert response.content == expected.content


@pytest.mark.parametrize("damage", ["a character of neither alphabet", "the two alphabets mixed", "padding inside",
                                    "4n + 1 characters", "three padding characters"])
def test_an_init_image_that_is_no_base64_is_still_a_one_line_422(api, damage):
    standard = padded_base64_with_both_extra_characters()
    text = {"a character of neither alphabet": standard[:40] + "*" + standard[41:],
            "the two alphabets mixed": standard.replace("/", "_", 1),
            "padding inside": standard[:40] + "=" + standard[40:],
            "4n + 1 characters": standard.rstrip("=")[:41],
            "three padding characters": standard.rstrip("=") + "==="}[damage]
    response = image_to_image(api, text)
    assert response.status_code == 422 and response.json() == {"error": "init_image is not base64"}, response.text


# defect: a guidance scale a hair past a limit was refused as "guidance_scale 1 is below 1" and "guidance_scale 30 is
# above 30" ({:g} keeps 6 digits): the message contradicted itself
@pytest.mark.parametrize("g, words", [(0.9999999, "guidance_scale 0.9999999 is below 1"),
                                      (30.000001, "guidance_scale 30.000001 is above 30")])
def test_a_guidance_scale_just_past_a_limit_is_named_as_given(api, g, words):
    response = api.post("/v1/images", json={"prompt": "a red star", "seed": 1, "guidance_scale": g})
    assert response.status_code == 422 and response.json()["error"].startswith(words), response.text


# defect: with one side given and off the grid, the error blamed the init image's aspect and said "give width and height
# for another size", though the side at fault is the one the client gave (and giving both does not help)
def test_a_given_side_off_the_grid_is_refused_without_blaming_the_init_images_aspect(api):
    response = image_to_image(api, png_base64((20, 12)), width=31)
    assert response.status_code == 422
    message = response.json()["error"]
    assert message.startswith("width 31 must be a positive multiple of the VAE factor 2") and "aspect" not in message, message


# defect: a negative prompt longer than the text encoder reads lost its end without a word, where `lcm generate` notes it
# ("--negative-prompt is N tokens, more than the ... the text encoder reads"), as the server notes a long prompt
def test_a_negative_prompt_longer_than_the_text_encoder_reads_is_answered_with_a_header(api):
    response = api.post("/v1/images", json={"prompt": "a red star", "seed": 1, "negative_prompt": "blue " * 40})
    assert response.status_code == 200, response.text
    assert response.headers["x-negative-prompt-truncated"].endswith("tokens, the text encoder reads 16")
    assert "x-prompt-truncated" not in response.headers
    short = api.post("/v1/images", json={"prompt": "a red star", "seed": 1, "negative_prompt": "blue"})
    assert "x-negative-prompt-truncated" not in short.headers


# defect: a gzip body (content-encoding: gzip, which the server does not decode) was "the body is not valid JSON: it is
# not UTF-8 text"; an unsupported content coding is a 415 naming it (RFC 9110 15.5.16)
def test_a_compressed_body_is_a_415_naming_its_content_encoding(api):
    response = api.post("/v1/images", content=gzip.compress(b'{"prompt": "a red star"}'),
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 415, response.text
    assert "content-encoding gzip" in response.json()["error"]


# defect: POST /v1/images/ (a trailing slash) was Starlette's 307 redirect with an empty body: a client that does not
# follow redirects read nothing, one that does sent its body twice. Now a 404 in the error shape that names the route
# (one path per operation, as /openapi.json and the metrics know it); a path that is no route's stays a plain 404
@pytest.mark.parametrize("method, path", [("POST", "/v1/images/"), ("GET", "/v1/config/"), ("GET", "/health//")])
def test_a_routes_path_with_a_trailing_slash_is_a_404_naming_the_route(api, method, path):
    response = api.request(method, path, json={"prompt": "a red star", "seed": 1} if method == "POST" else None,
                           follow_redirects=False)
    assert response.status_code == 404, response.text
    assert response.json() == {"error": f"Not Found: the path is {path.rstrip('/')}, without the trailing slash"}
    assert api.get("/v2/images/", follow_redirects=False).json() == {"error": "Not Found"}


# defect: /openapi.json described a 422 as FastAPI's {"detail": [...]}, while every refusal is {"error": "..."}, and
# left out the 413, 415, 429, 500 and 503 the API answers: a client generated from it misreads every error
def test_openapi_describes_the_error_shape_the_api_answers(api):
    spec = api.get("/openapi.json").json()
    responses = spec["paths"]["/v1/images"]["post"]["responses"]
    for status in ("413", "415", "422", "429", "500", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        name = schema["$ref"].rsplit("/", 1)[-1]
        assert list(spec["components"]["schemas"][name]["properties"]) == ["error"], (status, name)


# defect: SIGTERM waits for every open request, and a second SIGTERM did nothing (a second Ctrl-C forces the stop): a
# client stalled in its upload kept the server running for ever. (The same with two Ctrl-C, which printed the cancelled
# upload's traceback before "interrupted", is not here: in one CI run of 2026-12-07 it exited 0 with no line, a race in
# uvicorn's and asyncio's SIGINT handling not reproduced in 12 runs under load; an open defect.)
@pytest.mark.slow
@pytest.mark.parametrize("stop, code, words", [(signal.SIGTERM, 143, "terminated")], ids=["SIGTERM"])
def test_a_second_stop_signal_ends_a_server_held_by_a_stalled_upload_in_one_line(tiny_lcm, stop, code, words):
    process, port = started_server(tiny_lcm, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                            b'{"prompt": ')
            time.sleep(0.5)
            process.send_signal(stop)
            time.sleep(1)
            assert process.poll() is None  # the first waits for the upload (`UPLOAD_GRACE_S`)
            process.send_signal(stop)
            _, err = process.communicate(timeout=15)
        assert process.returncode == code and err == f"lcm serve: {words}\n", err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def received(connection: socket.socket) -> bytes:
    """Everything the server sends on `connection` until it closes it."""
    return b"".join(iter(lambda: connection.recv(65536), b""))


# defect: the first SIGTERM (or Ctrl-C) waited for every open request, one whose client stalled in its upload too: the
# server never stopped by itself. Now a body that has not arrived `Uploads.grace_s` after the stop began is answered 503,
# while the image being made is made, and a body that arrives within the wait is served
def test_a_stop_answers_a_stalled_upload_503_after_a_short_wait_and_finishes_the_images_it_took(lcm):
    import httpx
    import uvicorn

    from latent_consistency.cli.serve import stoppable_server

    gated = GatedGenerator(lcm)
    app = make_app(gated)
    app.state.uploads.grace_s = 1.0
    port = free_port()
    server = stoppable_server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app.state.uploads)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    wait_until(lambda: server.started)
    made = []
    making = threading.Thread(target=lambda: made.append(httpx.post(f"http://127.0.0.1:{port}/v1/images", timeout=60,
                                                                    json={"prompt": "made", "steps": 1, "seed": 1})))
    making.start()
    try:
        assert gated.entered.wait(30)  # its image is being made, held at the gate
        late_body = b'{"prompt": "late", "steps": 1, "seed": 2}'
        with socket.create_connection(("127.0.0.1", port)) as stalled, socket.create_connection(("127.0.0.1", port)) as late:
            stalled.sendall(UPLOAD_HEAD % 100 + b'{"prompt": ')
            late.sendall(UPLOAD_HEAD % len(late_body) + late_body[:10])
            stalled.settimeout(10)
            late.settimeout(30)
            time.sleep(0.3)  # both requests are open
            stopped = time.monotonic()
            server.should_exit = True  # what the first SIGTERM or Ctrl-C does
            time.sleep(0.3)
            late.sendall(late_body[10:])
            answer = received(stalled)
            assert time.monotonic() - stopped >= 1.0
            assert answer.startswith(b"HTTP/1.1 503 ") and SHUTTING_DOWN.encode() in answer, answer
            assert making.is_alive() and serving.is_alive()  # the image being made holds the stop
            gated.gate.set()
            assert received(late).startswith(b"HTTP/1.1 200 ")
        making.join(30)
        serving.join(30)
        assert made[0].status_code == 200 and not serving.is_alive()
    finally:
        gated.gate.set()
        server.should_exit = server.force_exit = True
        serving.join(10)


@pytest.mark.slow
def test_one_sigterm_answers_a_stalled_upload_503_and_ends_the_server_in_one_line(tiny_lcm):
    process, port = started_server(tiny_lcm, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(UPLOAD_HEAD % 100 + b'{"prompt": ')
            stalled.settimeout(UPLOAD_GRACE_S + 10)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            answer = received(stalled)
            _, err = process.communicate(timeout=15)
        assert answer.startswith(b"HTTP/1.1 503 ") and SHUTTING_DOWN.encode() in answer, answer
        assert process.returncode == 143 and err == "lcm serve: terminated\n", err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
