"""`lcm serve` image-to-image keeps the init image's shape: without width and height the image is made at the init image's
own (EXIF-upright) size, shrunk (never grown) to fit the server's and the model's limits and rounded down onto the model's
grid; one side given, the other follows the image's aspect; both given, the image is resized to them. The tiny LCM makes
16 px images on a grid of 2 px (its VAE factor); `make_app` allows up to 32 px a side."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from test_image_inputs import phone_jpeg
from test_pixart import tiny_pixart_lcm  # noqa: F401 (a fixture)
from test_serve import decoded, make_app, png_base64
from test_serve import generator as lcm  # noqa: F401 (a fixture: the tiny LCM)


@pytest.fixture(scope="module")
def api(lcm):  # noqa: F811 (the fixture)
    with TestClient(make_app(lcm), raise_server_exceptions=False) as c:
        yield c


def image_to_image(api, init_image: str, **size):
    return api.post("/v1/images", json={"prompt": "a red star", "seed": 3, "steps": 2, "init_image": init_image, "strength": 0.5}
                    | size)


def made_size(response) -> tuple[int, int]:
    """(width, height) of the image in a 200 answer."""
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content)).size


def test_a_non_square_init_image_is_made_at_its_own_size_as_the_library_makes_it(api, lcm):  # noqa: F811 (the fixture)
    from latent_consistency.grids import to_pil
    from latent_consistency.serve.request import Limits, decode_image, resized_pixels

    init_image = png_base64((20, 12))
    response = image_to_image(api, init_image)
    assert made_size(response) == (20, 12)  # was stretched to the model's 16 x 16
    init = resized_pixels(decode_image(init_image, Limits(max_side=32)), 20, 12)[None]
    expected = lcm(["a red star"], lcm.timesteps(2, strength=0.5), 8.0, [3], 12, 20, init_images=init, strength=0.5)
    np.testing.assert_array_equal(decoded(response.content), np.asarray(to_pil(expected)[0]))


@pytest.mark.parametrize("own, made", [((4032, 3024), (32, 24)), ((120, 50), (32, 12))], ids=["phone photo", "inexact aspect"])
def test_an_init_image_above_the_limit_is_shrunk_to_fit_keeping_its_aspect(api, own, made):
    width, height = made_size(image_to_image(api, png_base64(own)))  # was 16 x 16; no size: 422 for the server's 32 px
    assert (width, height) == made and max(width, height) == 32
    assert abs(height - width * own[1] / own[0]) < 2  # within one step of the aspect


def test_an_init_image_off_the_grid_is_rounded_down_onto_it(api):
    assert made_size(image_to_image(api, png_base64((21, 13)))) == (20, 12)  # was 16 x 16; own size: 422, not a multiple of 2


def test_an_exif_rotated_phone_jpeg_is_made_upright(api, tmp_path):
    stored_sideways = base64.b64encode(phone_jpeg(tmp_path / "phone.jpg").read_bytes()).decode()  # 32 x 16 as stored
    assert made_size(image_to_image(api, stored_sideways)) == (16, 32)


@pytest.mark.parametrize("own, given, made", [((20, 12), {"width": 30}, (30, 18)),
                                              ((20, 13), {"width": 30}, (30, 20)),  # 19.5: the nearest multiple of 2
                                              ((12, 20), {"height": 30}, (18, 30))])
def test_one_side_given_the_other_follows_the_init_images_aspect(api, own, given, made):
    assert made_size(image_to_image(api, png_base64(own), **given)) == made  # the missing side was the model's 16


def test_width_and_height_given_resize_the_init_image_to_them(api):
    """Today's behaviour, kept: an explicit size wins over the image's aspect (this test passes on the old code too)."""
    assert made_size(image_to_image(api, png_base64((120, 50)), width=16, height=32)) == (16, 32)


@pytest.mark.parametrize("own, given, message", [
    ((4, 4), {}, "height 4 and width 4 are too small for this model: .*; 4x4 keeps init_image's 4x4 px aspect: give width and "
                 "height for another size"),
    ((12, 40), {"width": 16}, "height 54 is above this server's limit of 32 px; 16x54 keeps init_image's 12x40 px aspect: give "
                              "width and height for another size"),
])
def test_a_size_taken_from_the_init_image_that_cannot_be_made_says_where_it_came_from(api, own, given, message):
    response = image_to_image(api, png_base64(own), **given)  # was made at 16 x 16
    assert response.status_code == 422, response.text
    assert "\n" not in response.json()["error"]
    assert re.fullmatch(message, response.json()["error"]), response.json()["error"]


def test_a_transformers_init_image_is_rounded_onto_its_patch_grid(tiny_pixart_lcm):  # noqa: F811 (the fixture)
    """A tiny PixArt-LCM's grid is its VAE factor 2 times its patch size 2: 23 x 14 is made at 20 x 12, not 22 x 14."""
    from latent_consistency.pipelines import LCMGenerator
    from latent_consistency.serve.request import ImageRequest, Limits, prepare

    generator = LCMGenerator.load(str(tiny_pixart_lcm), torch.device("cpu"), torch.float32)
    request = ImageRequest(prompt="a red star", init_image=png_base64((23, 14)), strength=0.5)
    job = prepare(request, generator, Limits(max_side=32), generator.default_guidance_scale())
    assert (job.width, job.height) == (20, 12) and job.init_image.shape == (3, 12, 20)  # was 16 x 16


def test_init_image_size_fits_a_phone_photo_onto_a_transformers_grid():
    """A PixArt-style model (VAE factor 8 x patch 2 = 16) under a 1000 px limit: 4032 x 3024 scaled to 1000 x 750, each side
    rounded down to 16; a sliver keeps one step; a photo within the limit keeps its size, not grown."""
    from latent_consistency.serve.request import init_image_size

    assert init_image_size((4032, 3024), None, None, 16, 1000) == (992, 736)
    assert init_image_size((3024, 4032), None, None, 16, 1024) == (768, 1024)
    assert init_image_size((4000, 10), None, None, 16, 1024) == (1024, 16)
    assert init_image_size((200, 120), None, None, 16, 1024) == (192, 112)
    assert init_image_size((200, 120), 512, 512, 16, 1024) == (512, 512)
