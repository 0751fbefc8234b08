"""The page of `lcm serve`, end to end in headless Chromium (Debian's package), driven over the DevTools protocol:
type a prompt, an image appears; move a slider, it changes; start from the last result (img2img)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import torch

from test_serve import ServerThread, make_app, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")]


class Browser:
    """Headless Chromium on one page, and the few DevTools calls the test needs."""

    def __init__(self, url: str):
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # chromium's helpers may still be writing
        self.process = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                         "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}", url],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        port = None
        for line in self.process.stderr:
            if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(found.group(1))
                break
        assert port, "chromium did not start its DevTools server"
        self.socket = self._page_socket(port)
        self.next_id = 0

    def _page_socket(self, port: int):
        import httpx
        import websocket

        pages = []
        wait_until(lambda: pages.extend(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page") or pages)
        return websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def key(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def wait_for_new_image(self, old: str, timeout: float = 60) -> str:
        wait_until(lambda: self.js("document.getElementById('image').src") not in ("", old), timeout)
        wait_until(lambda: self.js("document.getElementById('image').complete && document.getElementById('image').naturalWidth > 0"), timeout)
        return self.js("document.getElementById('image').src")

    def close(self):
        self.socket.close()
        os.killpg(self.process.pid, signal.SIGTERM)  # chromium and its helper processes
        self.process.wait(10)
        self.profile.cleanup()


def test_page_draws_as_you_type_and_follows_the_sliders(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    app = make_app(LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32))
    with ServerThread(app) as url:
        browser = Browser(url + "/")
        try:
            # the page (not the blank one chromium starts on) has loaded and read /v1/config
            wait_until(lambda: browser.js("location.href.startsWith('http') && document.readyState") == "complete", 60)
            wait_until(lambda: browser.js("document.getElementById('guidance-value')?.textContent") == "8", 60)
            # type a prompt, key by key: one image appears (stale requests were cancelled or superseded)
            browser.js("document.getElementById('prompt').focus()")
            for char in "a red star":
                browser.call("Input.insertText", text=char)
                time.sleep(0.02)
            first = browser.wait_for_new_image("")
            assert first.startswith("blob:")
            assert re.search(r"\d+ ms in the browser, [\d.]+ ms on the server", browser.js("document.getElementById('latency').textContent"))
            # move the steps slider with the keyboard: a new image, made with 5 steps
            browser.js("document.getElementById('steps').focus()")
            browser.key("ArrowRight", 39)
            assert browser.js("document.getElementById('steps-value').textContent") == "5"
            second = browser.wait_for_new_image(first)
            assert second != first
            # image to image from the last result
            browser.js("document.getElementById('use-last').click()")
            third = browser.wait_for_new_image(second)
            assert browser.js("document.getElementById('img2img').checked") is True and third != second
            assert browser.js("document.getElementById('status').className") != "error"
        finally:
            browser.close()
    counts = app.state.metrics.responses
    assert counts[200] >= 3 and set(counts) <= {200, 499}


def test_page_leaves_the_guidance_scale_to_the_model_until_the_slider_moves(tiny_lcm, tmp_path):
    """The page's requests leave g out until the user moves the slider, so the server samples at the model's recorded
    default as it is (4.2, of a run distilled on [1, 4.2]; not the slider's rounding of it, 4), and notes nothing about a g
    no one chose. Was: the page sent the default as if the user had given it."""
    from latent_consistency.guidance_record import GuidanceRecord, write_record
    from latent_consistency.pipelines import LCMGenerator

    model = tmp_path / "lcm"
    shutil.copytree(tiny_lcm, model)
    write_record(model, GuidanceRecord(1.0, 4.2, 4.2, None))
    app = make_app(LCMGenerator.load(str(model), torch.device("cpu"), torch.float32))
    with ServerThread(app) as url:
        browser = Browser(url + "/")
        try:
            wait_until(lambda: browser.js("location.href.startsWith('http') && document.readyState") == "complete", 60)
            wait_until(lambda: browser.js("document.getElementById('guidance-value')?.textContent") == "4.2", 60)
            assert browser.js("'guidance_scale' in JSON.parse(requestJSON(body()))") is False
            assert browser.js("document.getElementById('guidance').disabled") is False
            browser.js("document.getElementById('guidance').focus()")
            browser.key("ArrowRight", 39)  # the slider moved: its own value from here on
            assert browser.js("body().guidance_scale") == float(browser.js("document.getElementById('guidance').value"))
        finally:
            browser.close()
