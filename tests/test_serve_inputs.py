"""`lcm serve` against an adversarial client and a careless operator: numbers of the wrong JSON type are refused, not
coerced; a body that is not JSON (by content type, or JSON that Python cannot read) is one-line JSON error; every
answer is counted in the metrics; LCM-LoRA-only mistakes are refused before queueing; the command line refuses an
empty host and a --max-side below the model's size, and prints a URL that works for an IPv6 host."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import torch
from fastapi.testclient import TestClient

from test_serve import GatedGenerator, free_port, make_app, png_base64


def post(client, body: bytes, content_type: str | None = "application/json"):
    return client.post("/v1/images", content=body, headers={"content-type": content_type} if content_type else {})


def one_line_error(response) -> str:
    message = response.json()["error"]
    assert "\n" not in message and message
    return message


# --- JSON values of the wrong type: refused, never coerced (pydantic's lax mode turned "5" and true into 5 and 1) ---

WRONG_TYPES = {
    "seed as text": ("seed", '"5"'),
    "seed as true": ("seed", "true"),
    "seed as a float": ("seed", "5.0"),
    "seed in exponent notation": ("seed", "1e2"),
    "steps as true": ("steps", "true"),
    "steps as a float": ("steps", "2.0"),
    "steps as text": ("steps", '"2"'),
    "guidance as true": ("guidance_scale", "true"),
    "guidance as text": ("guidance_scale", '"3"'),
    "width as true": ("width", "true"),
    "width as a float": ("width", "16.0"),
    "height as text": ("height", '"16"'),
    "gamma as false": ("gamma", "false"),
    "negative scale as true": ("negative_scale", "true"),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(api, name):
    field, value = WRONG_TYPES[name]
    fields = {"prompt": '"x"', "steps": "1"} | ({"negative_prompt": '"y"'} if field == "negative_scale" else {}) | {field: value}
    response = post(api, ("{" + ", ".join(f'"{key}": {raw}' for key, raw in fields.items()) + "}").encode())
    assert response.status_code == 422, response.text
    assert one_line_error(response).startswith(f"{field}: ")


def test_numbers_of_the_right_type_are_still_taken(api):
    """An integer where a float goes (JSON has one number type; JavaScript writes 3.0 as 3), as the page sends them."""
    response = api.post("/v1/images", json={"prompt": "x", "steps": 2, "seed": 3, "guidance_scale": 3, "negative_prompt": "y",
                                            "negative_scale": 0, "gamma": 0})
    assert response.status_code == 200 and response.headers["x-seed"] == "3"


# --- bodies that are not JSON ---

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_not_sent_as_json_is_415_naming_the_content_type(api, content_type):
    """`curl -d` sends a form's content type, and a browser may send text/plain from any site without asking: both are
    refused with what to send, not with a puzzle about dictionaries."""
    response = post(api, b'{"prompt": "x", "steps": 1}', content_type)
    assert response.status_code == 415, response.text
    assert "content-type" in one_line_error(response) and "application/json" in response.json()["error"]


UNREADABLE_BODIES = {
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', "UTF-8"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "nested"),
    "a 5000-digit seed": (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "digits"),
    "a key twice": (b'{"prompt": "x", "prompt": "y", "steps": 1}', "prompt"),
}


@pytest.mark.parametrize("name", list(UNREADABLE_BODIES))
def test_json_python_cannot_read_is_a_422_in_the_error_shape(api, name):
    """Before: 400 {"detail": "There was an error parsing the body"} (or, for a key given twice, the last one silently won)."""
    body, words = UNREADABLE_BODIES[name]
    response = post(api, body)
    assert response.status_code == 422, response.text
    message = one_line_error(response)
    assert message.startswith("the body is not valid JSON") and words in message


def test_unknown_paths_and_methods_answer_in_the_error_shape(api):
    wrong_method = api.get("/v1/images")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert one_line_error(wrong_method) == "Method Not Allowed"
    missing = api.get("/v2/images")
    assert missing.status_code == 404 and one_line_error(missing) == "Not Found"


def test_init_images_are_decoded_a_few_at_a_time(lcm, monkeypatch):
    """A 200 kB PNG of 8000 x 8000 px takes about 250 MB and a second to decode, before the request queues (where the
    queue's limit would refuse it): at most `MAX_DECODING` at once, not one per thread of the pool (40)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from latent_consistency.serve import app as app_module
    from latent_consistency.serve import request as request_module

    lock, running, most = threading.Lock(), [0], [0]
    decode = request_module.decode_image

    def counted(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return decode(*args)

    monkeypatch.setattr(request_module, "decode_image", counted)
    body = {"prompt": "x", "steps": 1, "init_image": png_base64(), "strength": 0.5}
    with TestClient(make_app(lcm)) as c, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: c.post("/v1/images", json=body).status_code, range(8)))
    assert statuses == [200] * 8
    assert most[0] == app_module.MAX_DECODING == 2


# --- the metrics count every answer ---

def requests_total(client) -> dict[str, int]:
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("lcm_requests_total{")]
    return {line.split('"')[1]: int(line.split()[-1]) for line in lines}


def test_a_500_is_counted(lcm, monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(type(lcm), "__call__", fails)
    with TestClient(make_app(lcm), raise_server_exceptions=False) as c:
        assert c.post("/v1/images", json={"prompt": "x", "steps": 1}).status_code == 500
        assert requests_total(c) == {"500": 1}


def test_a_client_that_leaves_before_its_body_arrives_is_counted_as_gone_not_as_a_500(lcm):
    app = make_app(lcm)
    messages = iter([{"type": "http.request", "body": b'{"prompt": "a', "more_body": True}, {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": "POST", "path": "/v1/images", "raw_path": b"/v1/images",
             "root_path": "", "scheme": "http", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    with TestClient(app) as c:
        asyncio.run(app(scope, receive, send))
        assert sent == []  # nobody to answer
        assert requests_total(c) == {"499": 1}


# --- an LCM-LoRA: its own mistakes are refused before queueing, naming the fields ---

@pytest.fixture(scope="module")
def lora_generator(tiny_sd, tmp_path_factory):
    from latent_consistency.pipelines import LCMGenerator
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path_factory.mktemp("lora"), tiny_sd)
    return LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, str(lora))


@pytest.mark.parametrize("body, words", [
    ({"negative_prompt": "y"}, "guidance_scale"),  # the LoRA's default guidance 1 has no unconditional pass to put it in
    ({"negative_prompt": "y", "guidance_scale": 1.5, "negative_scale": 0.5}, "negative_scale"),
], ids=["negative prompt at guidance 1", "negative scale"])
def test_lora_only_mistakes_are_refused_before_the_model_runs(lora_generator, body, words):
    gated = GatedGenerator(lora_generator)
    gated.gate.set()
    with TestClient(make_app(gated), raise_server_exceptions=False) as c:
        response = c.post("/v1/images", json={"prompt": "x", "steps": 1} | body)
        assert response.status_code == 422 and words in one_line_error(response)
        assert c.post("/v1/images", json={"prompt": "x", "steps": 1, "negative_prompt": "y", "guidance_scale": 1.5}).status_code == 200
    assert gated.prompts == ["x"]  # only the good request reached the model


# --- the command line ---

@pytest.fixture
def serve_without_blocking(monkeypatch):
    """`lcm serve` up to the point where uvicorn would serve forever."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)


def test_serve_command_refuses_an_empty_host(run_error, tiny_lcm, serve_without_blocking):
    """--host "" (an unset variable, say) binds every interface of the machine: refused, not served to the network."""
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--host", "", "--port", str(free_port())])
    assert code == 2 and "--host" in err and err.count("\n") == 0


def test_serve_command_refuses_a_max_side_below_the_models_size(run_error, tiny_lcm, serve_without_blocking):
    """Every request without width and height (the page's) would be refused."""
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--max-side", "8", "--port", str(free_port())])
    assert code == 2 and "--max-side 8" in err and err.count("\n") == 0


def test_serve_command_refuses_a_max_side_no_request_may_ask_for(run_error, tiny_lcm, serve_without_blocking):
    """/v1/config would advertise sizes above 8x the model's, which every request is refused."""
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--max-side", "4096", "--port", str(free_port())])
    assert code == 2 and "--max-side 4096 is more than 8x" in err and err.count("\n") == 0


def test_serve_command_prints_a_url_that_works_for_an_ipv6_host(tiny_lcm, capsys, serve_without_blocking):
    from latent_consistency.cli import main

    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", "--model", str(tiny_lcm), "--device", "cpu", "--host", "::1", "--port", str(port)]) in (0, None)
    assert f"http://[::1]:{port}/" in capsys.readouterr().out


def test_a_prompt_longer_than_the_text_encoder_reads_is_answered_with_a_header(api, lcm):
    """Its end is dropped, as diffusers drops it; the answer says so, as `lcm generate` notes it on stderr."""
    tokenizer = lcm.model.prompts.tokenizer
    prompt = " ".join(["red"] * tokenizer.model_max_length)
    tokens = len(tokenizer(prompt, truncation=False).input_ids)
    long = api.post("/v1/images", json={"prompt": prompt, "steps": 1})
    short = api.post("/v1/images", json={"prompt": "red", "steps": 1})
    assert long.status_code == short.status_code == 200
    assert long.headers["X-Prompt-Truncated"] == f"{tokens} tokens, the text encoder reads {tokenizer.model_max_length}"
    assert "X-Prompt-Truncated" not in short.headers
