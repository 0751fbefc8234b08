"""A preview decoder: a tiny, approximate stand-in for the VAE's decoder D, for images to look at rather than measure.

TAESD (Bohan 2023, github.com/madebyollin/taesd; diffusers' `AutoencoderTiny`) is a small convolutional autoencoder
distilled from Stable Diffusion's VAE: `madebyollin/taesd` decodes SD 1.x/2.x latents, `madebyollin/taesdxl` SDXL's, and
`lcm world preview-decoder` distils one for the built-in world (`world.preview_decoder`). Only its decoder is used
here; images are still encoded by the full VAE (img2img).

Which latents it takes: TAESD decodes the latents the diffusion model sees (SD's E(x)·0.18215, about unit variance), so
its config says `scaling_factor` 1.0, and a diffusers pipeline whose `vae` is an AutoencoderTiny decodes with
`vae.decode(latents / vae.config.scaling_factor)`. Our latents are already scaled that way (`models.LatentCodec`), so
`PreviewDecoder.decode` makes exactly that call on them.

Which VAE it was made for: nothing in the files says. taesd (SD 1.x/2.x) and taesdxl (SDXL) have the same config (4
latent channels, 8x, `scaling_factor` 1.0, `latent_magnitude` 3, `latent_shift` 0.5); only their weights differ, and
so do the two VAEs' latent spaces (the 0.18215 and 0.13025 scaling factors are the VAEs', applied before either tiny
decoder sees a latent). So `PreviewDecoder.check_colours` decodes a probe, flat colour patches encoded by the model's
own VAE, with both decoders, and says so in one line when the tiny one's colours are grossly off the VAE's
(`GROSSLY_OFF`). A note, not a refusal: the thresholds were set on the world's decoders and estimated for the released
ones, not measured on them (their weights cannot be fetched here), and a preview is only a preview. A VAE that
does not itself give the probe's colours back (the world's, which knows only its shapes and digits; a test's random one)
cannot judge it: then nothing is checked.
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from pathlib import Path

import torch

from latent_consistency.errors import UserError, first_line
from latent_consistency.hub import TOP_FILES, TOP_IGNORED, check_hub_id, weights_hint

TINY_CLASS = "AutoencoderTiny"
# `check_colours`' probe: the 8 corners of the RGB cube at 0.1 and 0.9, each a patch of PROBE_PATCH x PROBE_PATCH latent pixels
PROBE_PATCH = 4
# Mean |colour error| of the probe's patches, on a 0-1 scale: a VAE within VAE_GIVES_BACK of the probe judges the tiny
# decoder, which gets a note (used all the same) beyond GROSSLY_OFF of the VAE. Measured (docs/guide.md, "Fast previews"; 8x8-pixel block
# colours): 0.017 for a world preview decoder on its VAE's latents of reference images, 0.27-0.50 for it on the same latents
# with channels swapped or negated; 0.33 and 0.39 estimated for SD latents into an SDXL decoder and the reverse, from the
# two VAEs' linear latent-to-RGB maps
VAE_GIVES_BACK, GROSSLY_OFF = 0.05, 0.2
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # a diffusers model folder's weights, as save_pretrained names them


class PreviewDecoder:
    """A diffusers `AutoencoderTiny` used as a decoder only: scaled latents -> images in [-1, 1] (not clamped)."""

    def __init__(self, tiny, source: str = ""):
        self.tiny, self.source = tiny, source

    @property
    def latent_channels(self) -> int:
        return int(self.tiny.config.latent_channels)

    @property
    def upsampling_factor(self) -> int:
        """Image pixels per latent pixel: one upsampling between each two of its decoder's stages."""
        config = self.tiny.config
        return int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], as a diffusers pipeline with this AutoencoderTiny as its VAE decodes them."""
        tiny = self.tiny
        return tiny.decode(latents.to(tiny.device, tiny.dtype) / tiny.config.scaling_factor).sample

    def check_fits(self, latent_channels: int, downsampling_factor: int) -> PreviewDecoder:
        """Refuse a decoder made for another latent space: other channels, another size factor, or a shifted space."""
        if self.latent_channels != latent_channels:
            raise UserError(f"preview decoder {self.source} decodes {self.latent_channels}-channel latents, but the model's VAE makes "
                            f"{latent_channels}-channel ones; give the tiny decoder made for this model's VAE (madebyollin/taesd for "
                            "SD 1.x/2.x, madebyollin/taesdxl for SDXL, `lcm world preview-decoder` for the world)")
        if self.upsampling_factor != downsampling_factor:
            raise UserError(f"preview decoder {self.source} upsamples latents {self.upsampling_factor}x, but the model's VAE "
                            f"downsamples images {downsampling_factor}x; give the tiny decoder made for this model's VAE")
        if float(self.tiny.config.get("shift_factor") or 0.0) != 0.0:
            raise UserError(f"preview decoder {self.source} decodes a shifted latent space (shift_factor "
                            f"{self.tiny.config.shift_factor}, as SD3's and FLUX's); this model's latents are only scaled")
        return self

    @torch.no_grad()
    def check_colours(self, codec) -> PreviewDecoder:
        """Say (one line on stderr) when the decoder looks made for another VAE's latents of the same shape (taesdxl for an
        SD 1.5 model, taesd for SDXL), which `check_fits` cannot tell apart: its colours on the probe (`probe_image`, encoded
        by `codec`, the model's VAE without a preview decoder) against the VAE's own decode of the same latents. One small
        encode and two decodes. Returns the decoder: used either way."""
        factor = codec.downsampling_factor
        probe = probe_image(factor)
        latents = codec.encode(probe)
        vae = patch_colours(codec.decode(latents).float().cpu(), factor)
        if not (vae - patch_colours(probe, factor)).abs().mean() / 2 < VAE_GIVES_BACK:  # NaN too: no verdict
            return self
        off = float((patch_colours(self.decode(latents).float().cpu(), factor) - vae).abs().mean() / 2)
        if off > GROSSLY_OFF:
            print(f"note: preview decoder {self.source} draws colours {off:.0%} off the model's VAE on flat colour patches: it looks "
                  "made for another VAE's latents (madebyollin/taesd is SD 1.x/2.x's, madebyollin/taesdxl the SDXL family's)",
                  file=sys.stderr, flush=True)
        return self


def probe_image(factor: int) -> torch.Tensor:
    """`check_colours`' probe, [1, 3, H, W] in [-1, 1]: the 8 corners of the RGB cube at 0.1 and 0.9 as flat patches of
    `PROBE_PATCH` latent pixels a side, in 2 rows of 4: colours any VAE of natural images gives back."""
    side = PROBE_PATCH * factor
    corners = torch.tensor([[r, g, b] for r in (-0.8, 0.8) for g in (-0.8, 0.8) for b in (-0.8, 0.8)])
    patches = corners.view(2, 4, 3, 1, 1).expand(2, 4, 3, side, side)
    return patches.permute(2, 0, 3, 1, 4).reshape(1, 3, 2 * side, 4 * side)


def patch_colours(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The mean colour [8, 3] of the central half of each of `probe_image`'s patches in `images`: away from the edges,
    where a decoder blends neighbours."""
    side = PROBE_PATCH * factor
    margin = side // 4
    patches = images[0].reshape(3, 2, side, 4, side)[:, :, margin:side - margin, :, margin:side - margin]
    return patches.mean((2, 4)).permute(1, 2, 0).reshape(8, 3)


def load_preview_decoder(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> PreviewDecoder:
    """An `AutoencoderTiny` from a folder (saved by `save_pretrained` or `lcm world preview-decoder`) or a hub id
    (`madebyollin/taesd`), safetensors weights only, in eval mode without gradients on `device`."""
    from diffusers import AutoencoderTiny

    folder = check_hub_id(name_or_path, "the preview decoder", TOP_FILES, TOP_IGNORED)  # a hub id's snapshot in the cache
    path = Path(folder)
    if not path.exists():
        raise UserError(f"preview decoder {name_or_path} does not exist; give an AutoencoderTiny folder (`lcm world preview-decoder` "
                        "makes one for the world) or a hub id such as madebyollin/taesd")
    if not (path / "config.json").is_file():
        raise UserError(f"preview decoder {name_or_path} is not a diffusers model folder (no config.json); give an AutoencoderTiny folder")
    try:
        config = AutoencoderTiny.load_config(folder)
        if not isinstance(config, dict):
            raise UserError(f"preview decoder {name_or_path}: its config.json holds a JSON {type(config).__name__}, not an object; "
                            "save the decoder again")
        if config.get("_class_name") != TINY_CLASS:
            raise UserError(f"preview decoder {name_or_path} is not an {TINY_CLASS} (TAESD) folder: its config names {config.get('_class_name')}; "
                            "give a tiny decoder such as madebyollin/taesd or one made by `lcm world preview-decoder`")
        if not (path / WEIGHTS_FILE).is_file():  # diffusers would log its own error before raising one
            hint = weights_hint(path, TINY_CLASS) or f"{path} holds no {WEIGHTS_FILE}; give the folder {TINY_CLASS}.save_pretrained writes"
            raise UserError(f"cannot load the preview decoder {name_or_path}: {hint}")
        _check_config_numbers(name_or_path, config)
        tiny, info = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, TypeError) as err:  # TypeError: a config value of the wrong type, met by a layer's constructor
        raise UserError(f"cannot load the preview decoder {name_or_path}: {first_line(err)}") from err
    _check_loaded_tensors(name_or_path, info)
    return PreviewDecoder(tiny.to(device).eval().requires_grad_(False), name_or_path)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_config_numbers(name_or_path: str, config: dict) -> None:
    """The config numbers `PreviewDecoder` computes with, where the config gives them (diffusers' defaults otherwise): whole
    latent channels, a scaling factor the latents are divided by (0, negative or infinite makes every image garbage), a
    whole upsampling factor (2.5 makes images of another size than asked) and a shift factor that is a number."""
    checks = (("latent_channels", _whole, "a whole number >= 1 (TAESD's is 4)"),
              ("scaling_factor", lambda v: _number(v) and v > 0, "a positive number (TAESD's is 1.0)"),
              ("upsampling_scaling_factor", _whole, "a whole number >= 1 (TAESD's is 2)"),
              ("shift_factor", lambda v: v is None or _number(v), "a number or null"))
    for key, valid, what in checks:
        if key in config and not valid(config[key]):
            raise UserError(f"preview decoder {name_or_path}: its config.json's {key} is {json.dumps(config[key])}, not {what}; "
                            "give an AutoencoderTiny folder saved by save_pretrained")


def _check_loaded_tensors(name_or_path: str, info: dict) -> None:
    """Weights that hold every tensor of the config's model and no other: diffusers leaves a missing one uninitialised (on the
    meta device, a traceback when the decoder is moved) and drops an unexpected one, with a logged warning only."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing:
        which = f"lack {len(missing)} tensor(s) of its config.json's model (e.g. {missing[0]})"
    elif unexpected:
        which = f"hold {len(unexpected)} tensor(s) its config.json's model does not have (e.g. {unexpected[0]})"
    else:
        return
    raise UserError(f"the weights of preview decoder {name_or_path} {which}: the weights and config.json are of different "
                    "models; save the decoder again")
