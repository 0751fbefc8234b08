"""CLIP score and CLIP image features, for models outside the built-in world (Section 5.1 of Luo et al. 2023).

CLIP score (Hessel et al. 2021): 100 · max(cos(E_image, E_text), 0), averaged over image-prompt pairs, with any
`CLIPModel` from a local folder or a hub id (the paper used ViT-g/14). Its projected image embeddings are also a
feature network for `evaluation.fid` (FID in CLIP features). Images are resized (bicubic, shorter side) and
centre-cropped to the model's input size and normalised with its preprocessor's mean and std, in torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from latent_consistency.errors import UserError
from latent_consistency.evaluation.fid import check_image_range
from latent_consistency.hub import TOP_IGNORED, check_hub_id, given_name

# OpenAI CLIP's normalisation, for model folders without a preprocessor_config.json
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# The files of a CLIP model's hub repo that `ClipModel.load` reads, at its top: configs, tokenizer (vocab.json, merges.txt),
# CLIPModel's weights (not an open_clip copy beside them)
CLIP_FILES = ("*.json", "*.txt", "model*.safetensors")


class ClipModel(torch.nn.Module):
    """A CLIP model as a scorer of image-prompt pairs and as a feature network ([-1, 1] images -> [B, D])."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.feature_dim = int(model.config.projection_dim)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, name_or_path: str, device: torch.device | str = "cpu") -> ClipModel:
        """A CLIP model folder (`~` expanded) or hub id, read from its snapshot in the local cache (`hub.check_hub_id`: online,
        downloaded first; offline, one not in the cache is a UserError saying so and how to fetch it)."""
        from safetensors import SafetensorError
        from transformers import CLIPModel, CLIPTokenizer

        given = given_name(name_or_path, "a CLIP model from")  # "" would read the current folder
        name_or_path = check_hub_id(given, "a CLIP model from", CLIP_FILES, TOP_IGNORED)
        try:
            model, info = CLIPModel.from_pretrained(name_or_path, use_safetensors=True, output_loading_info=True)
            tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, SafetensorError) as err:
            raise UserError(f"cannot load a CLIP model from {given}: give a local folder saved by CLIPModel.save_pretrained "
                            "(safetensors, with its tokenizer) or, online, a hub id such as openai/clip-vit-large-patch14") from err
        missing = sorted(info.get("missing_keys") or [])
        if missing:  # transformers fills them with random weights, and only logs it
            raise UserError(f"{given} is not a whole CLIP model: its weights lack {len(missing)} of CLIPModel's tensors "
                            f"({', '.join(missing[:2])}, ...), e.g. a text encoder alone; give a CLIP model with its image tower")
        return cls(model, tokenizer, *image_stats(Path(name_or_path) / "preprocessor_config.json")).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images of any size -> the model's normalised input: shorter side resized, centre crop."""
        device = self.mean.device
        x = (images.to(device).float().clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))), mode="bicubic",
                          align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings [B, D] (the FID features) of [-1, 1] images (`fid.check_image_range`)."""
        check_image_range(images, "the images given to CLIP")
        return self.model.get_image_features(pixel_values=self.preprocess(images)).pooler_output

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Projected text embeddings [B, D], each prompt cut to the tokens the text model has positions for (a tokenizer
        saved without model_max_length would not cut it)."""
        longest = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=longest, return_tensors="pt").to(self.mean.device)
        return self.model.get_text_features(**tokens).pooler_output

    @torch.no_grad()
    def scores(self, image_features: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """The CLIP score of each image, given by its projected embedding (`features`: the FID features, so that an
        evaluation runs the image tower once per image), with its prompt: 100 · max(cos, 0), [B]."""
        check_pairs(len(image_features), prompts)
        text = torch.cat([self.text_features(prompts[start:start + batch_size]) for start in range(0, len(prompts), batch_size)])
        cosine = (F.normalize(image_features.to(text.device), dim=-1) * F.normalize(text, dim=-1)).sum(-1)
        return 100 * cosine.clamp(min=0)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> float:
        """The mean CLIP score of image i with prompt i."""
        check_pairs(len(images), prompts)
        features = torch.cat([self.features(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])
        return float(self.scores(features, prompts, batch_size).mean())


def check_pairs(images: int, prompts: list[str]) -> None:
    """A UserError unless there is one prompt per image, and at least one: a CLIP score pairs them."""
    if images != len(prompts) or not prompts:
        raise UserError(f"CLIP score needs one prompt per image, got {images} images and {len(prompts)} prompts")


def image_stats(config: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the CLIP model's image normalisation: its preprocessor_config.json's image_mean and image_std (three
    numbers each, std positive), OpenAI CLIP's where there is no such file or it gives none; a UserError naming the file
    when it is not JSON or its values are not such numbers."""
    if not config.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        stats = json.loads(config.read_text(encoding="utf-8"))
        mean, std = (tuple(float(v) for v in stats.get(key, default)) for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as err:
        raise UserError(f"cannot read the image normalisation of {config} ({err.__class__.__name__}): save the CLIP model's "
                        "preprocessor again, or remove the file to use OpenAI CLIP's") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"{config} gives image_mean {list(mean)} and image_std {list(std)}: each needs three numbers, one per "
                        "RGB channel (std positive); save the CLIP model's preprocessor again")
    return mean, std
