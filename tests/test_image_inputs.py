"""Every image the package reads is decoded alike (`data.images.open_rgb8`): a training image, `lcm generate`'s
--init-image and the API's init_image are turned upright by their EXIF orientation, 16-bit depth is scaled and not
clipped, transparency is composited on white; and cropping a training image costs no more than its crop."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_consistency.data.images import _resize_center_crop, decode_rgb

RED, BLUE, WHITE = (220, 20, 20), (20, 20, 220), (255, 255, 255)


def phone_jpeg(path: Path) -> Path:
    """A JPEG stored sideways (32 wide, 16 tall: red left, blue right) with EXIF orientation 6 ("rotate 90° clockwise to
    view"): upright it is 16 wide, 32 tall, red on top and blue below."""
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16], stored[:, 16:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def sixteen_bit_png(path: Path) -> Path:
    """A 16-bit grey PNG at 20000 of 65535: 78 in 8 bits (clipped at 255 it would be white)."""
    Image.fromarray(np.full((32, 16), 20000, np.uint16)).save(path, format="PNG")
    return path


def transparent_png(path: Path) -> Path:
    """A fully transparent PNG whose hidden colour is red: white once composited."""
    Image.new("RGBA", (16, 32), (255, 0, 0, 0)).save(path, format="PNG")
    return path


def read_as_training_image(path: Path) -> np.ndarray:
    image, _ = decode_rgb(path, 16)  # the central 16 x 16 of the upright 16 x 32
    return to_uint8(image)


def read_as_cli_init_image(path: Path) -> np.ndarray:
    from latent_consistency.cli.generate import read_init_image

    image, height, width = read_init_image(str(path), None, None, 8)  # at the image's own (upright) size
    assert (height, width) == (32, 16)
    return to_uint8(image[0])


def read_as_api_init_image(path: Path) -> np.ndarray:
    from latent_consistency.serve.request import Limits, decode_image, resized_pixels

    image = decode_image(base64.b64encode(path.read_bytes()).decode(), Limits(max_side=64))
    assert image.size == (16, 32)  # upright
    return to_uint8(resized_pixels(image, 16, 32))


def to_uint8(image) -> np.ndarray:
    """[3, H, W] in [-1, 1] as [H, W, 3] 0-255."""
    return ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(int)


READERS = {"training": read_as_training_image, "cli": read_as_cli_init_image, "api": read_as_api_init_image}


@pytest.mark.parametrize("reader", list(READERS))
def test_a_phone_photo_is_read_upright(reader, tmp_path):
    pixels = READERS[reader](phone_jpeg(tmp_path / "phone.jpg"))
    top, bottom = pixels[1, [1, -2]], pixels[-2, [1, -2]]  # left and right of each
    assert np.abs(top - RED).max() < 40 and np.abs(bottom - BLUE).max() < 40, (top, bottom)


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", ["16-bit", "transparent"])
def test_16_bit_depth_and_transparency_are_read_as_for_training(reader, case, tmp_path):
    path = sixteen_bit_png(tmp_path / "grey.png") if case == "16-bit" else transparent_png(tmp_path / "clear.png")
    expected = (78, 78, 78) if case == "16-bit" else WHITE
    assert np.abs(READERS[reader](path) - expected).max() <= 1


def test_unreadable_init_images_are_one_line_errors(tmp_path):
    from latent_consistency.cli.generate import read_init_image
    from latent_consistency.errors import UserError
    from latent_consistency.serve.request import Limits, decode_image

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="cannot read init image .*empty.png: not an image file"):
        read_init_image(str(tmp_path / "empty.png"), None, None, 8)
    with pytest.raises(UserError, match="cannot read init_image: not an image file"):
        decode_image(base64.b64encode(b"not a picture").decode(), Limits(max_side=64))


def test_api_init_image_may_be_base64_wrapped_in_lines_but_not_garbage():
    from latent_consistency.errors import UserError
    from latent_consistency.serve.request import Limits, decode_image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    plain = base64.b64encode(buffer.getvalue()).decode()
    wrapped = base64.encodebytes(buffer.getvalue()).decode()  # 76 columns, as `base64` prints it
    assert "\n" in wrapped.strip()
    limits = Limits(max_side=64)
    assert decode_image(wrapped, limits).tobytes() == decode_image(plain, limits).tobytes()
    assert decode_image("data:image/png;base64,\r\n" + wrapped, limits).tobytes() == decode_image(plain, limits).tobytes()
    with pytest.raises(UserError, match="not base64"):
        decode_image(wrapped[:40] + "\n%%%\n" + wrapped[40:], limits)


def old_resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """The crop before it resampled only the square: the whole image scaled, then cropped."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@pytest.mark.parametrize("size,resolution", [((300, 200), 64), ((200, 300), 64), ((640, 480), 512), ((37, 100), 64), ((33, 32), 16)])
def test_center_crop_gives_what_scaling_the_whole_image_gave(size, resolution):
    y, x = np.mgrid[0:size[1], 0:size[0]]
    wave = np.sin(x / 9.0)[..., None] * np.cos(y / 7.0)[..., None] * np.array([1.0, 0.5, -0.7])
    image = Image.fromarray((127 + 100 * wave).astype(np.uint8))
    new, old = (np.asarray(crop(image, resolution)).astype(int) for crop in (_resize_center_crop, old_resize_center_crop))
    assert new.shape == (resolution, resolution, 3) and np.abs(new - old).max() <= 2


def test_a_long_thin_image_costs_no_more_than_its_crop():
    """A 1 x 20000 PNG (166 bytes) at 64 px: scaled whole before the crop it was 64 x 1,280,000 px (600 MB)."""
    script = textwrap.dedent("""
        import io, resource, sys
        from PIL import Image
        from latent_consistency.data.images import decode_rgb
        buffer = io.BytesIO()
        Image.new("RGB", (1, 20000), (10, 200, 30)).save(buffer, format="PNG")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        image, _ = decode_rgb(buffer.getvalue(), 64)
        assert tuple(image.shape) == (3, 64, 64)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(peak // (1024 if sys.platform == "linux" else 2**20))  # MiB: Linux counts KiB, macOS bytes
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 50
