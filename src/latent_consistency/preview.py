"""A preview decoder: a tiny, approximate stand-in for the VAE's decoder D, for images to look at rather than measure.

TAESD (Bohan 2023, github.com/madebyollin/taesd; diffusers' `AutoencoderTiny`) is a small convolutional autoencoder
distilled from Stable Diffusion's VAE: `madebyollin/taesd` decodes SD 1.x/2.x latents, `madebyollin/taesdxl` SDXL's, and
`lcm world preview-decoder` distils one for the built-in world (`world.preview_decoder`). Only its decoder is used
here; images are still encoded by the full VAE (img2img).

Which latents it takes: TAESD decodes the latents the diffusion model sees (SD's E(x)·0.18215, about unit variance), so
its config says `scaling_factor` 1.0, and a diffusers pipeline whose `vae` is an AutoencoderTiny decodes with
`vae.decode(latents / vae.config.scaling_factor)`. Our latents are already scaled that way (`models.LatentCodec`), so
`PreviewDecoder.decode` makes exactly that call on them.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch

from latent_consistency.errors import UserError, first_line
from latent_consistency.hub import TOP_FILES, TOP_IGNORED, check_hub_id

TINY_CLASS = "AutoencoderTiny"
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
            raise UserError(f"preview decoder {name_or_path} holds no {WEIGHTS_FILE} (weights as PyTorch pickles are not loaded here); "
                            "save it again with save_pretrained(FOLDER, safe_serialization=True)")
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
