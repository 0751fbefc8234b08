"""Four small defects a user met, each with what was around it:
- `lcm serve` called a float TIFF init image "not a PNG, JPEG or WebP image" (it is a TIFF; `lcm generate --init-image`
  reads one in [0, 1] and says why it refuses another): now both read the same images and refuse with the same reason;
- the page opened as /lcm behind a proxy that serves it under /lcm/ asked /v1/... (outside the prefix): now /lcm/v1/...;
- `lcm evaluate --style-lora`'s grids labelled the styled LCM's rows "LCM": now "LCM + STYLE at W";
- a preview decoder made for another VAE of the same shape (taesdxl on SD 1.5, taesd on SDXL: their files differ in weights
  only) drew wrong colours silently: now named in a one-line note when its colours on a probe are grossly off the VAE's."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from test_preview_decoder import save_tiny_autoencoder
from test_serve import make_app, wait_until
from test_serve_page import CHROMIUM, Browser
from test_serve_page2 import serving


@pytest.fixture(scope="module")
def generator(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


# --- 1. a float TIFF init image ---

def float_tiff(values: np.ndarray) -> bytes:
    """A 32-bit float TIFF of `values` ([H, W]: one channel, which Pillow opens in mode "F"; [H, W, 3]: RGB, which it does
    not open), written by hand: Pillow saves no float RGB."""
    height, width = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    data = values.astype("<f4").tobytes()
    per_channel = 8 + len(data)  # BitsPerSample's and SampleFormat's arrays follow the pixels (for 3 channels)
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, channels, 32 if channels == 1 else per_channel),
            (259, 3, 1, 1), (262, 3, 1, 1 if channels == 1 else 2), (273, 4, 1, 8), (277, 3, 1, channels), (278, 3, 1, height),
            (279, 4, 1, len(data)), (284, 3, 1, 1), (339, 3, channels, 3 if channels == 1 else per_channel + 6)]
    arrays = b"" if channels == 1 else struct.pack("<3H", 32, 32, 32) + struct.pack("<3H", 3, 3, 3)
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else struct.pack("<HHII", tag, kind, count, value)
        for tag, kind, count, value in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8 + len(data) + len(arrays)) + data + arrays + ifd


def post_init_image(client, data: bytes):
    return client.post("/v1/images", json={"prompt": "a red star", "steps": 2, "seed": 3, "width": 16, "height": 16,
                                           "init_image": base64.b64encode(data).decode()})


def test_serve_reads_a_float_tiff_as_generate_does_and_refuses_the_others_with_generates_reason(generator, tmp_path):
    """A float TIFF in [0, 1] (scikit-image's and OpenCV's scale) is the 8-bit image of its values x 255, as in `lcm generate`;
    one of 0-255 floats (no scale its file states) and a float RGB TIFF (Pillow cannot open it) were "not a PNG, JPEG or
    WebP image" (false for a TIFF): now a 422 with the reason `lcm generate --init-image` gives for the same file."""
    from fastapi.testclient import TestClient

    from latent_consistency.cli.generate import read_init_image
    from latent_consistency.errors import UserError

    gray = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    png = io.BytesIO()
    Image.fromarray(np.rint(gray * 255).astype(np.uint8)).save(png, format="PNG")
    with TestClient(make_app(generator)) as client:
        read = post_init_image(client, float_tiff(gray))
        assert read.status_code == 200, read.text
        assert read.content == post_init_image(client, png.getvalue()).content
        for name, values, why in (("scaled.tif", gray * 255, "its scale is unknown"),
                                  ("rgb.tif", np.stack([gray] * 3, -1), "not an image file Pillow can decode")):
            (tmp_path / name).write_bytes(float_tiff(values))
            with pytest.raises(UserError) as generate:
                read_init_image(str(tmp_path / name), 16, 16, 2)
            reason = str(generate.value).split(": ", 1)[1]  # after "cannot read init image PATH"
            answer = post_init_image(client, (tmp_path / name).read_bytes())
            assert why in reason and answer.status_code == 422 and answer.json() == {"error": f"cannot read init_image: {reason}"}, answer.text


# --- 2. the page opened without the prefix's final slash ---

def proxy_under(prefix: str, app):
    """A reverse proxy that serves `app` under `prefix` and strips it, passing the prefix itself on as "/" (Traefik's
    StripPrefix, an nginx `location /lcm` without the slash)."""
    from starlette.responses import PlainTextResponse

    async def proxy(scope, receive, send):
        if scope["path"] != prefix and not scope["path"].startswith(prefix + "/"):
            return await PlainTextResponse("nothing is served here", status_code=404)(scope, receive, send)
        path = scope["path"][len(prefix):] or "/"
        await app(dict(scope, path=path, raw_path=path.encode()), receive, send)

    return proxy


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_the_page_opened_as_the_prefix_without_its_slash_asks_its_api_under_the_prefix(generator):
    """was: opened as http://host/lcm the page resolved "v1/config" against "/" and asked /v1/config, outside what the proxy
    serves: "The server cannot be reached" for ever. Now its API's URLs are under /lcm/, and its controls are set from
    /v1/config (the title names the model)."""
    server = serving(proxy_under("/lcm", make_app(generator)))
    url = server.__enter__()
    browser = Browser(url + "/lcm")
    try:
        wait_until(lambda: browser.js("document.title") == "lcm serve: tiny", 60)
        assert browser.js("[IMAGES_URL, CONFIG_URL].map((u) => new URL(u, location.href).pathname)") == ["/lcm/v1/images",
                                                                                                        "/lcm/v1/config"]
    finally:
        browser.close()
        server.__exit__(None, None, None)


def test_an_app_under_a_root_path_sends_its_prefix_without_the_slash_to_the_page():
    """uvicorn's --root-path (or a Mount): /lcm is redirected to /lcm/, where the page's relative URLs are under the prefix."""
    from fastapi.testclient import TestClient

    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    class Unloaded:  # the page and its redirect need no model
        kind = "lcm"

        def default_guidance_scale(self):
            return 8.0

    client = TestClient(create_app(Unloaded(), Limits(max_side=64)), root_path="/lcm")
    answer = client.get("/lcm", follow_redirects=False)
    assert answer.status_code in (307, 308) and answer.headers["location"].endswith("/lcm/")
    assert client.get("/lcm/").text.startswith("<!doctype html>")


# --- 3. lcm evaluate --style-lora's grid labels ---

@pytest.mark.parametrize("styles, label", [([], "LCM"), ([("styles/papercut.safetensors", 0.8)], "LCM + papercut at 0.8"),
                                           ([("runs/ink/pytorch_lora_weights.safetensors", 1.0), ("user/pastel", -0.5)],
                                            "LCM + ink at 1 + pastel at -0.5")])
def test_style_label_names_each_style_lora_and_its_weight(styles, label):
    from latent_consistency.cli.evaluate import style_label

    assert style_label(styles) == label


def test_evaluates_grids_label_the_styled_lcms_rows_with_the_style(tiny_lcm, tmp_path, run_error, monkeypatch):
    """was: grid.png and guidance_grid.png labelled the rows sampled with a style LoRA "LCM, 1 step, g = ...", as the plain
    LCM's: now "LCM + style at 0.7, ..."."""
    from latent_consistency.evaluation import table
    from test_evaluate_inputs import Linear
    from tiny_models import save_tiny_lora, write_captioned_images

    labels = []
    monkeypatch.setattr(table, "image_grid", lambda rows, row_labels, **kw: labels.append(row_labels) or Image.new("RGB", (4, 4)))
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(tmp_path / "inception.pt"))
    (tmp_path / "prompts.txt").write_text("a red star\na blue ring\n")
    style = save_tiny_lora(tmp_path / "style", tiny_lcm, seed=5)
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--style-lora", f"{style}:0.7", "--prompts", str(tmp_path / "prompts.txt"),
                           "--reference", str(write_captioned_images(tmp_path / "images", 2)), "--inception", str(tmp_path / "inception.pt"),
                           "--steps", "1", "--guidance-scales", "2,3", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0, err
    assert labels == [["LCM + style at 0.7, 1 step, g = 3"], ["LCM + style at 0.7, 1 step, g = 2", "LCM + style at 0.7, 1 step, g = 3"]]


# --- 4. a preview decoder made for another VAE ---

class ProbeKeepingCodec:
    """A VAE that gives flat colours back (as SD's and SDXL's do): its latent is the 2x2 mean colour and a zero channel."""

    downsampling_factor, latent_channels = 2, 4

    def encode(self, images):
        pooled = torch.nn.functional.avg_pool2d(images.float(), 2)
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], 1)

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3].float(), scale_factor=2)


def test_a_preview_decoder_whose_colours_are_grossly_off_the_vaes_is_named_one_that_agrees_not(tmp_path, capsys):
    from latent_consistency.preview import GROSSLY_OFF, PreviewDecoder, load_preview_decoder

    codec = ProbeKeepingCodec()
    other = load_preview_decoder(str(save_tiny_autoencoder(tmp_path / "other")))  # random weights: another latent space's colours
    assert other.check_colours(codec) is other
    assert "made for another VAE's latents" in capsys.readouterr().err

    class Agreeing(PreviewDecoder):  # the VAE's colours, a little off everywhere (a tiny decoder's approximation)
        def decode(self, latents):
            return codec.decode(latents) + GROSSLY_OFF

    assert Agreeing(other.tiny).check_colours(codec).tiny is other.tiny
    assert capsys.readouterr().err == ""


def test_generate_names_a_preview_decoder_made_for_another_vae_in_one_line(tiny_lcm, tmp_path, run_error, monkeypatch):
    """was: images written in another VAE's colours, without a word; now a one-line note, and the images. The tiny models' own random VAE does not give flat
    colours back, so it cannot judge a decoder: for this test it decodes as one that does."""
    from latent_consistency.models import LatentCodec

    monkeypatch.setattr(LatentCodec, "encode", lambda self, images, *a, **k: ProbeKeepingCodec().encode(images))
    monkeypatch.setattr(LatentCodec, "decode", lambda self, latents: ProbeKeepingCodec().decode(latents)
                        if self.preview is None else self.preview.decode(latents))
    out = tmp_path / "images"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--steps", "1", "--device", "cpu",
                           "--preview-decoder", str(save_tiny_autoencoder(tmp_path / "taesdxl")), "--out", str(out)])
    assert code == 0, err
    assert [line for line in err.splitlines() if "made for another VAE's latents" in line], err
    assert len(list(out.glob("*.png"))) == 1


def test_a_vae_that_does_not_give_the_probe_back_judges_no_preview_decoder(generator, tmp_path):
    """The tiny models' random VAE (like the world's, which knows only its shapes and digits) is no judge: kept, unchecked."""
    from latent_consistency.models import LatentCodec
    from latent_consistency.preview import load_preview_decoder

    preview = load_preview_decoder(str(save_tiny_autoencoder(tmp_path / "taesd")))
    assert preview.check_colours(LatentCodec(generator.model.vae)) is preview


def test_an_app_under_a_root_path_counts_its_image_requests(lcm):
    """uvicorn's --root-path (or a Mount) puts the prefix in the request's path (/lcm/v1/images): the metrics counted an
    image request only at the path /v1/images, so an app served under a prefix reported none."""
    from fastapi.testclient import TestClient

    from test_serve import make_app

    with TestClient(make_app(lcm), root_path="/lcm") as client:
        assert client.post("/lcm/v1/images", json={"prompt": "a red star", "steps": 1}).status_code == 200
        assert client.post("/lcm/v1/images", json={"prompt": "a red star", "steps": 0}).status_code == 422
        metrics = client.get("/lcm/metrics").text
    assert 'lcm_requests_total{code="200"} 1' in metrics and 'lcm_requests_total{code="422"} 1' in metrics, metrics
