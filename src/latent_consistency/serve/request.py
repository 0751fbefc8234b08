"""One image request of the HTTP API, checked against the server's limits, and the key under which requests share a
forward pass.

The JSON body is validated in two stages: `ImageRequest` (pydantic) checks what does not depend on the model (types,
finite numbers, step range, prompt length); `prepare` checks the rest against the loaded model and the `Limits`
(guidance range of an ω input, the init image, the size: by default an init image's, `init_image_size`) and returns a
`Job` ready for the batcher. Every failure is a `UserError` with one line that names the field: the app answers it
with 422.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from latent_consistency.data.images import TooManyPixels, UndecodableImage, open_rgb8
from latent_consistency.errors import UserError
from latent_consistency.pipelines import DEFAULT_STRENGTH, MAX_SEED, MAX_SIZE_FACTOR, LCMGenerator
from latent_consistency.prompts import utf8_error
from latent_consistency.sampling import check_tcd_steps

MAX_STEPS = 8  # an LCM's useful range (Algorithm 3 with 1-8 steps)
MAX_INIT_PIXELS = 64 * 2**20  # an init image's width x height, refused from its header before it is decoded
# base64 as clients send it (RFC 4648): the standard alphabet (section 4) or the URL-safe one (section 5: - and _ for + and
# /), one of them, with its = padding or without (many clients strip it)
BASE64 = re.compile(r"(?:[A-Za-z0-9+/]*|[A-Za-z0-9_-]*)={0,2}")
URL_SAFE = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_side: int  # pixels, per side
    max_prompt_chars: int = 1000
    max_upload_bytes: int = 4 * 2**20  # the decoded init image
    max_body_bytes: int = 6 * 2**20  # the whole JSON body (a base64 init image is 4/3 of its bytes)
    max_guidance_scale: float = 30.0

    def __post_init__(self):
        if self.max_side < 1 or self.max_prompt_chars < 1 or self.max_upload_bytes < 1:
            raise UserError("server limits must be positive")


DEFAULT_SIZE_DOC = ("the model's size; with init_image, the image's own size (shrunk to fit the limits, rounded down to "
                    "the model's grid), or the other side times its aspect")  # width's and height's, in /openapi.json


class ImageRequest(BaseModel):
    """A text-to-image (or, with `init_image`, image-to-image) request; sizes default to the model's own, or to the init
    image's aspect (`init_image_size`)."""

    # strict: a JSON value of the wrong type is refused, not coerced ("5" or true as a seed, 2.0 as steps); an integer
    # still goes where a float does (JSON has one number type)
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="what to draw")
    negative_prompt: str | None = Field(None, description="what not to draw (guidance against its embedding, see the user guide)")
    negative_scale: float | None = Field(None, ge=0, le=30, allow_inf_nan=False, description="strength of the negative prompt")
    steps: int = Field(4, ge=1, le=MAX_STEPS, description="sampling steps (Algorithm 3)")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="g = ω + 1; default: the model's")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed; random when absent (returned in X-Seed)")
    width: int | None = Field(None, ge=1, description=f"pixels, a multiple of the VAE factor; default: {DEFAULT_SIZE_DOC}")
    height: int | None = Field(None, ge=1, description=f"pixels, a multiple of the VAE factor; default: {DEFAULT_SIZE_DOC}")
    gamma: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="TCD's γ (fresh noise between steps, so steps >= 2); absent: Algorithm 3")
    init_image: str | None = Field(None, description="image-to-image start: an image file (PNG, JPEG, WebP, TIFF, ...: what "
                                                     "`lcm generate --init-image` reads) as base64 (standard or URL-safe, "
                                                     "= padding optional) or a data: URL")
    strength: float = Field(DEFAULT_STRENGTH, gt=0, le=1, allow_inf_nan=False, description="with init_image: how much of it to redraw")
    format: Literal["png", "jpeg"] = Field("png", description="response image format")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _unicode(cls, text: str | None) -> str | None:
        """Text a tokenizer takes: JSON can spell a lone surrogate ("\\udc80"), which is no Unicode text."""
        problem = None if text is None else utf8_error(text)
        if problem is not None:
            raise ValueError(f"not Unicode text ({problem})")
        return text


@dataclass
class Job:
    """A checked request: what the generator needs for this image, and the key of the batch it may join."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    format: str
    gamma: float | None = None
    strength: float = 1.0
    init_image: torch.Tensor | None = None  # [3, H, W] in [-1, 1]
    negative_prompt: str | None = None
    negative_scale: float | None = None
    key: tuple = field(init=False)

    def __post_init__(self):
        # Requests share a forward pass when everything but prompt, seed and init image agree
        self.key = (self.steps, self.guidance_scale, self.width, self.height, self.gamma,
                    self.strength if self.init_image is not None else None, self.init_image is not None,
                    self.negative_prompt is not None, self.negative_scale)


def prepare(request: ImageRequest, generator: LCMGenerator, limits: Limits, default_guidance_scale: float) -> Job:
    """The `Job` for a validated request, checked against the model and the limits (`UserError` otherwise)."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise UserError(f"{name} has {len(text)} characters; the limit is {limits.max_prompt_chars}")
    if not request.prompt.strip():
        raise UserError("prompt is blank")
    if request.negative_scale is not None and request.negative_prompt is None:
        raise UserError("negative_scale applies to a negative prompt: give negative_prompt")
    if "strength" in request.model_fields_set and request.init_image is None:
        raise UserError("strength applies to image-to-image: give init_image")
    if request.gamma is not None:
        check_tcd_steps(request.steps, "gamma", "steps of 2 or more")
    g = default_guidance_scale if request.guidance_scale is None else request.guidance_scale
    if g > limits.max_guidance_scale:
        raise UserError(f"guidance_scale {g:.15g} is above {limits.max_guidance_scale:g}; {generator.usual_guidance()}")
    if generator.kind == "lcm" and g < 1:
        raise UserError(f"guidance_scale {g:.15g} is below 1: this LCM takes g through its ω input (ω = g - 1 >= 0)")
    if generator.kind == "lora" and request.negative_prompt is not None:  # before it queues (`LCMGenerator.consistency_function`)
        if request.negative_scale is not None:
            raise UserError("negative_scale applies to an LCM with an ω input; this one (an LCM-LoRA or PixArt-LCM) takes negative_prompt "
                            "into classifier-free guidance "
                            "at guidance_scale: leave negative_scale out")
        if g <= 1:
            raise UserError(f"negative_prompt on this LCM without an ω input (an LCM-LoRA or PixArt-LCM) needs guidance_scale above 1 "
                            f"(classifier-free guidance; got {g:g}): "
                            "give e.g. 1.5")
    image = decode_image(request.init_image, limits) if request.init_image is not None else None  # decoded once
    width, height = request_size(request, image, generator, limits)
    init = resized_pixels(image, width, height) if image is not None else None
    generator.timesteps(request.steps, strength=request.strength if init is not None else 1.0)  # a strength that leaves too few steps
    return Job(prompt=request.prompt, seed=secrets.randbelow(2**31) if request.seed is None else request.seed, steps=request.steps,
               guidance_scale=float(g), width=width, height=height, format=request.format, gamma=request.gamma,
               strength=request.strength if init is not None else 1.0, init_image=init, negative_prompt=request.negative_prompt,
               negative_scale=request.negative_scale)


def request_size(request: ImageRequest, image, generator: LCMGenerator, limits: Limits) -> tuple[int, int]:
    """The (width, height) a request makes, checked against the model and the limits: the sides given, the model's square
    size for those missing, or with an init image (`image`, decoded upright) sides at its aspect (`init_image_size`). An
    error about a side chosen from the init image says so, as the client did not name it."""
    if image is None:
        width, height = request.width or generator.default_size(), request.height or generator.default_size()
    else:
        step = generator.model.codec.downsampling_factor * generator.model.patch_size
        largest = min(limits.max_side, MAX_SIZE_FACTOR * generator.default_size())  # what the server and `check_size` allow
        width, height = init_image_size(image.size, request.width, request.height, step, largest)
    try:
        for name, value in (("width", width), ("height", height)):
            if value > limits.max_side:
                raise UserError(f"{name} {value} is above this server's limit of {limits.max_side} px")
        generator.check_size(height, width, flag="")
    except UserError as err:
        given = [f"{name} {value} " for name, value in (("width", request.width), ("height", request.height)) if value is not None]
        if image is None or len(given) == 2 or any(str(err).startswith(side) for side in given):  # about a side the client named
            raise
        raise UserError(f"{err}; {width}x{height} keeps init_image's {image.width}x{image.height} px aspect: give width and "
                        "height for another size") from None
    return width, height


def init_image_size(size: tuple[int, int], width: int | None, height: int | None, step: int, largest: int) -> tuple[int, int]:
    """The (width, height) of an image-to-image request whose init image is `size` (upright): the sides given; one side
    missing is the other at the image's aspect, to the nearest multiple of `step`; both missing, the image's own size,
    scaled down (never up) until both sides fit `largest`, each rounded down to a multiple of `step`. Every side made here
    is at least one `step`.

    So a photo keeps its shape, as `lcm generate --init-image` and diffusers' img2img pipelines keep it, instead of being
    stretched to the model's square, and a client need not know the model's grid (the VAE factor times a transformer's
    patch size) or the server's limits to send one: a 4032x3024 phone photo becomes 1024x768 under a 1024 px limit."""
    own_width, own_height = size
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, max(step, (2 * width * own_height + own_width * step) // (2 * own_width * step) * step)
    if height is not None:
        return max(step, (2 * height * own_width + own_height * step) // (2 * own_height * step) * step), height
    longest = max(own_width, own_height)
    scaled = (own_width, own_height) if longest <= largest else (own_width * largest // longest, own_height * largest // longest)
    return max(step, scaled[0] - scaled[0] % step), max(step, scaled[1] - scaled[1] % step)


def decode_image(data: str, limits: Limits):
    """A base64 image file (`base64_bytes`: standard or URL-safe, padded or not; line breaks allowed; or a data: URL) as an
    upright 8-bit RGB PIL image; decoded as training images and `lcm generate --init-image` are (`data.images.open_rgb8`:
    EXIF orientation, 16-bit depth, alpha, a float TIFF in [0, 1]), and refused with the same reason (a float image off
    that scale is a TIFF, not "not an image")."""
    if data[:5].lower() == "data:":  # a data: URL (RFC 2397; its scheme in any case): its data follows the first comma
        if "," not in data:
            raise UserError("init_image is a data: URL without a comma before its data: send data:MIME;base64,DATA")
        data = data.split(",", 1)[1]
    payload = "".join(data.split())  # base64 wrapped at 76 columns
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise UserError(f"init_image is larger than {limits.max_upload_bytes // 2**20} MiB, this server's limit; send a smaller image")
    try:
        image, _ = open_rgb8(base64_bytes(payload), max_pixels=MAX_INIT_PIXELS)
    except TooManyPixels as err:
        raise UserError(f"init_image is {err}") from None
    except UndecodableImage as err:  # `UnknownScale` among them
        raise UserError(f"cannot read init_image: {err}") from None
    return image


def base64_bytes(payload: str) -> bytes:
    """The bytes `payload` spells in standard or URL-safe base64, padded or not (`BASE64`); a `UserError` for a character
    outside the alphabet, the two alphabets mixed, or a length no base64 has (4n + 1 characters)."""
    if BASE64.fullmatch(payload) is None:
        raise UserError("init_image is not base64")
    data = payload.rstrip("=").translate(URL_SAFE)
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except binascii.Error:
        raise UserError("init_image is not base64") from None


def resized_pixels(image, width: int, height: int) -> torch.Tensor:
    """An RGB PIL image resized to (width, height) as [3, height, width] in [-1, 1]: the init image of a `Job`."""
    from PIL import Image

    image = image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1
