"""`lcm serve` against inputs a demanding client sends that no other test did: a data: URL cut before its comma or with its
scheme in capitals, a guidance scale a hair past a limit, one init-image side off the grid, a negative prompt longer than
the text encoder reads, a gzip body, a client stalled in its upload when the server is stopped, and a code generator reading
/openapi.json for the error shape."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import time

import pytest
import torch
from fastapi.testclient import TestClient

from test_serve import make_app, png_base64, started_server


@pytest.fixture(scope="module")
def lcm(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def api(lcm):
    with TestClient(make_app(lcm), raise_server_exceptions=False) as c:
        yield c


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
            assert process.poll() is None  # the first waits for the open request
            process.send_signal(stop)
            _, err = process.communicate(timeout=15)
        assert process.returncode == code and err == f"lcm serve: {words}\n", err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
