"""The Inception network of the usual FID tools, as a feature network for `evaluation.fid`.

FID numbers are comparable across papers only with the same Inception graph (the TensorFlow 2015-12-05 one) and
resizing. StyleGAN2-ADA, EDM and clean-fid ship it as a TorchScript file taking uint8-range [0, 255] images of any
size and returning its 2048 pool features with `return_features=True`; that file is loaded here as it is
(TorchScript, not a pickle: no Python code of its own runs). Nothing is downloaded: pass the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latent_consistency.errors import UserError
from latent_consistency.evaluation.fid import check_image_range

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WHAT_TO_PASS = f"--inception inception-2015-12-05.pt (the TorchScript FID network of StyleGAN2-ADA/EDM/clean-fid: {INCEPTION_URL})"


class InceptionFeatures(torch.nn.Module):
    """[-1, 1] images -> the FID network's features [B, 2048]."""

    def __init__(self, network: torch.nn.Module, feature_dim: int = 2048):
        super().__init__()
        self.network, self.feature_dim = network, feature_dim

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", size: int = 64) -> InceptionFeatures:
        """The network in `path`, probed with two images of `size` px, the size it will score (the generated images'): a
        network whose feature width depends on the image size is measured at that one, and one that does not give each
        image of a batch its own features is refused before any sampling."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Inception file {path} does not exist; pass {WHAT_TO_PASS}")
        try:
            network = torch.jit.load(str(path), map_location=device).eval()
            with torch.no_grad():
                probe = network(torch.zeros(2, 3, size, size, device=device), return_features=True)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{path} is not the TorchScript FID Inception network; pass {WHAT_TO_PASS}") from err
        return cls(network, feature_width(probe, path))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The features [B, F] of [-1, 1] images (`fid.check_image_range`), given to the network in [0, 255]."""
        check_image_range(images, "the images given to Inception")
        device = next(iter(self.network.parameters()), torch.empty(0)).device
        uint8_range = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(device)
        features = self.network(uint8_range, return_features=True)
        if not isinstance(features, torch.Tensor) or features.shape != (len(images), self.feature_dim):
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise UserError(f"the Inception network gave features of shape {shape} for {len(images)} images of "
                            f"{images.shape[-2]}x{images.shape[-1]} px, not [{len(images)}, {self.feature_dim}] as for the one it was "
                            f"loaded with; pass {WHAT_TO_PASS}")
        return features.float()


def feature_width(probe, path: Path) -> int:
    """The width F of the features [2, F] that the network in `path` returned for two images; a UserError for anything
    else (a tuple, a feature map [2, C, H, W], one row for the batch): FID could not be computed on it, and would fail
    only after sampling, or count one image's features for two."""
    if isinstance(probe, torch.Tensor) and probe.dim() == 2 and probe.shape[0] == 2 and probe.shape[1] > 0:
        return int(probe.shape[1])
    shape = f"a tensor of shape {list(probe.shape)}" if isinstance(probe, torch.Tensor) else f"a {type(probe).__name__}"
    raise UserError(f"{path} returns {shape} for two images, not a vector of features per image; pass {WHAT_TO_PASS}")
