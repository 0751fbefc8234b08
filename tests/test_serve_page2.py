"""The page of `lcm serve` the way a user meets it, in one headless Chromium (`test_serve_page.Browser`): behind a proxy
that serves it under a path prefix, with a prompt that holds HTML, emoji and right-to-left text and is longer than the
text encoder reads, a prompt cleared while its image is drawn, a seed box holding a stray "-", the server stopped and
started again, a full queue, and a second model, an LCM-LoRA, under another prefix."""

from __future__ import annotations

import shutil

import pytest
import torch

from test_serve import GatedGenerator, ServerThread, make_app, wait_until
from test_serve_page import CHROMIUM, Browser

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")]

# Arabic first (the box turns right-to-left), markup that would run if it reached the DOM as HTML, an emoji, and more
# words than the tiny text encoder's 16 tokens
PROMPT = "نجمة حمراء <img src=x onerror=window.pwned=1> 🌟 " + "red " * 16


def behind_a_proxy(apps: dict):
    """An ASGI app serving each of `apps` under its path prefix, as a reverse proxy that strips the prefix serves it."""
    from starlette.responses import PlainTextResponse

    async def proxy(scope, receive, send):
        prefix = next((p for p in apps if scope["path"].startswith(p + "/")), None)
        if prefix is None:
            return await PlainTextResponse("nothing is served here", status_code=404)(scope, receive, send)
        path = scope["path"][len(prefix):]
        await apps[prefix](dict(scope, path=path, raw_path=path.encode()), receive, send)

    return proxy


def serving(app, port: int | None = None) -> ServerThread:
    """`ServerThread` on `port` (default: a free one) without the lifespan protocol, which a proxy of two apps does not
    speak: the test starts and stops their batchers itself."""
    server = ServerThread(app)
    if port is not None:
        server.port = server.server.config.port = port
    server.server.config.lifespan = "off"
    return server


@pytest.fixture(scope="module")
def apps(tiny_lcm, tiny_sd, tmp_path_factory):
    """An LCM whose record says it ignores g (gated: a test holds its batches), an LCM-LoRA (no ω input), and an LCM
    that responds to g, distilled on g ∈ [1, 2]."""
    from latent_consistency.guidance_record import GuidanceRecord, write_record
    from latent_consistency.pipelines import LCMGenerator
    from tiny_models import save_tiny_lora

    lcm = shutil.copytree(tiny_lcm, tmp_path_factory.mktemp("models") / "lcm")
    write_record(lcm, GuidanceRecord(1.0, 4.2, 4.2, {499: 0.01}))
    gated = GatedGenerator(LCMGenerator.load(str(lcm), torch.device("cpu"), torch.float32))
    gated.gate.set()
    lora = save_tiny_lora(tmp_path_factory.mktemp("lora"), tiny_sd)
    ranged = shutil.copytree(tiny_lcm, tmp_path_factory.mktemp("models") / "ranged")
    write_record(ranged, GuidanceRecord(1.0, 2.0, 2.0, {499: 0.9}))
    served = {"/lcm": make_app(gated), "/lora": make_app(LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, str(lora))),
              "/ranged": make_app(LCMGenerator.load(str(ranged), torch.device("cpu"), torch.float32))}
    for app in served.values():
        app.state.batcher.start()
    yield gated, served
    for app in served.values():
        app.state.batcher.stop()


def responses(app) -> int:
    return sum(app.state.metrics.responses.values())


def test_page_under_a_prefix_through_stale_requests_bad_input_and_a_server_restart(apps):
    gated, served = apps
    server = serving(behind_a_proxy(served))
    url = server.__enter__()
    browser = Browser(url + "/lcm/")
    js = browser.js
    try:
        # was: the page fetched /v1/config and /v1/images from the host's root, which a proxy does not send to this server
        wait_until(lambda: js("location.pathname === '/lcm/' && document.readyState") == "complete", 60)
        wait_until(lambda: js("document.getElementById('guidance-value').textContent") == "4.2", 60)
        # was: nothing said that this LCM's slider does nothing (its record measured no response to g); then the slider
        # moved, and every request sent the default g as if the user had chosen it: each image came with "this LCM
        # ignores its guidance scale". Now the slider is off, says why, and the requests leave g to the server
        assert "off: this LCM hardly responds to it" in js("document.getElementById('guidance-range').textContent")
        assert js("document.getElementById('guidance').disabled") is True
        js("window.drawn = []; new MutationObserver(() => drawn.push(image.src)).observe(image, {attributeFilter: ['src']})")
        # was: the file input had no label, the status was not announced, and the image's alt text never said what it shows
        assert js("[...document.querySelectorAll('input, textarea')].filter((e) => !e.labels.length).map((e) => e.id)") == []
        assert js("document.getElementById('status').getAttribute('aria-live')") == "polite"
        assert js("document.getElementById('image').alt") == ""

        # a prompt with markup, emoji and right-to-left text, longer than the text encoder reads
        js("document.getElementById('prompt').focus()")
        browser.call("Input.insertText", text=PROMPT)
        first = browser.wait_for_new_image("")
        assert js("document.querySelectorAll('img').length") == 1 and js("window.pwned") is None  # text, never HTML
        assert js("document.getElementById('image').alt") == f"image drawn from the prompt: {PROMPT}"
        assert js("document.getElementById('prompt').matches(':dir(rtl)')") is True
        # was: the page did not show the header of a prompt's end silently dropped
        status = js("[document.getElementById('status').textContent, document.getElementById('status').className]")
        assert "the text encoder reads 16" in status[0] and status[1] != "error"
        assert "ignores its guidance scale" not in status[0]  # no note on a g the user could not choose

        # was: a prompt cleared while its image was drawn left that request running; its image then appeared under the
        # blank prompt and its answer wiped the "Type a prompt." that stood there
        before, shown = responses(served["/lcm"]), len(js("drawn"))
        gated.gate.clear()
        gated.entered.clear()
        js("document.getElementById('prompt').select()")
        browser.call("Input.insertText", text="a blue ring")
        assert gated.entered.wait(30)  # its batch runs, held at the gate
        js("document.getElementById('prompt').select()")
        browser.key("Backspace", 8)
        wait_until(lambda: js("document.getElementById('status').textContent") == "Type a prompt.", 30)
        gated.gate.set()
        wait_until(lambda: responses(served["/lcm"]) > before, 30)  # answered: drawn (200) or dropped (499)
        browser.call("Input.insertText", text="a red star")
        wait_until(lambda: js("document.getElementById('image').alt") == "image drawn from the prompt: a red star", 30)
        second = browser.wait_for_new_image(first)
        assert len(js("drawn")) == shown + 1, "the cleared prompt's image appeared"

        # was: a "-" typed into the seed box (which reads as blank) was overwritten with a random seed and drawn
        js("document.getElementById('seed').value = ''; document.getElementById('seed').focus()")
        browser.call("Input.insertText", text="-")
        wait_until(lambda: "seed must be a whole number" in js("document.getElementById('status').textContent"), 30)
        assert js("document.getElementById('seed').validity.badInput") is True
        js("document.getElementById('seed').value = ''")
        browser.call("Input.insertText", text="3")
        third = browser.wait_for_new_image(second)
        # was: "1e1" (which the number box takes) refused as no whole number; a fraction still is
        assert js("wholeNumber('1e1') === 10n && wholeNumber('1.5E3') === 1500n && wholeNumber('12.0') === 12n") is True
        assert js("[wholeNumber('1.5'), wholeNumber('1e99'), wholeNumber('-1'), wholeNumber('.')]") == [None] * 4
        js("document.getElementById('seed').value = ''")
        browser.call("Input.insertText", text="1e1")
        wait_until(lambda: "seed 10)" in js("document.getElementById('latency').textContent"), 30)
        third = js("document.getElementById('image').src")

        # was: "TypeError: Failed to fetch" once the server stopped, and no image until the next keystroke after it came back
        server.__exit__(None, None, None)
        js("document.getElementById('prompt').focus()")
        browser.call("Input.insertText", text=" again")
        wait_until(lambda: "cannot be reached; trying again" in js("document.getElementById('status').textContent"), 30)
        server = serving(behind_a_proxy(served), port=server.port)
        server.__enter__()
        fourth = browser.wait_for_new_image(third)
        assert js("document.getElementById('status').className") != "error"
        # was: a full queue's 429 (or a stopping server's 503) stayed on the page until the next keystroke
        batcher = served["/lcm"].state.batcher
        batcher.max_queue = 0  # every request is refused as a full queue refuses it
        browser.call("Input.insertText", text=" please")
        wait_until(lambda: js("document.getElementById('status').textContent").startswith("429: "), 30)
        assert "try again shortly; trying again" in js("document.getElementById('status').textContent")
        batcher.max_queue = 32
        browser.wait_for_new_image(fourth)

        # was: an LCM without an ω input had a slider from g = 0, where every g up to 1 makes the same unguided image
        browser.call("Page.navigate", url=url + "/lora/")
        wait_until(lambda: js("location.pathname === '/lora/' && document.readyState") == "complete", 60)
        wait_until(lambda: js("document.getElementById('guidance-value').textContent") == "1", 60)
        assert js("document.getElementById('guidance').min") == "1"
        assert js("document.getElementById('guidance').disabled") is False  # classifier-free guidance: g does something
        assert "classifier-free, 1 is none" in js("document.getElementById('guidance-range').textContent")

        # the server's X-Guidance-Note shown beside the image: a g moved outside the range the LCM was distilled on
        browser.call("Page.navigate", url=url + "/ranged/")
        wait_until(lambda: js("location.pathname === '/ranged/' && document.readyState") == "complete", 60)
        wait_until(lambda: "distilled on 1 to 2" in js("document.getElementById('guidance-range').textContent"), 60)
        js("document.getElementById('prompt').focus()")
        browser.call("Input.insertText", text="a red star")
        wait_until(lambda: js("document.getElementById('image').alt") == "image drawn from the prompt: a red star", 60)
        assert js("document.getElementById('status').textContent") == ""  # the default g, inside the range: no note
        js("const g = document.getElementById('guidance'); g.value = 8; g.dispatchEvent(new Event('input'))")
        wait_until(lambda: "outside [1, 2], the range this model's omega input was distilled on"
                   in js("document.getElementById('status').textContent"), 60)
    finally:
        browser.close()
        server.__exit__(None, None, None)
    assert set(served["/lcm"].state.metrics.responses) <= {200, 429, 499}


def test_config_says_whether_the_lcm_ignores_its_guidance_scale(apps):
    from fastapi.testclient import TestClient

    gated, served = apps
    # no lifespan (no `with`): the module's batchers run already
    assert TestClient(served["/lcm"]).get("/v1/config").json()["ignores_guidance"] is True
    assert TestClient(served["/lora"]).get("/v1/config").json()["ignores_guidance"] is False
