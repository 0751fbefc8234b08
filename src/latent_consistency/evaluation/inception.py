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

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WHAT_TO_PASS = f"--inception inception-2015-12-05.pt (the TorchScript FID network of StyleGAN2-ADA/EDM/clean-fid: {INCEPTION_URL})"


class InceptionFeatures(torch.nn.Module):
    """[-1, 1] images -> the FID network's features [B, 2048]."""

    def __init__(self, network: torch.nn.Module, feature_dim: int = 2048):
        super().__init__()
        self.network, self.feature_dim = network, feature_dim

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> InceptionFeatures:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Inception file {path} does not exist; pass {WHAT_TO_PASS}")
        try:
            network = torch.jit.load(str(path), map_location=device).eval()
            probe = network(torch.zeros(1, 3, 64, 64, device=device), return_features=True)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{path} is not the TorchScript FID Inception network; pass {WHAT_TO_PASS}") from err
        return cls(network, feature_width(probe, path))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.network.parameters()), torch.empty(0)).device
        uint8_range = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(device)
        return self.network(uint8_range, return_features=True).float()


def feature_width(probe, path: Path) -> int:
    """The width F of the features [1, F] that the network in `path` returned for one image; a UserError for anything
    else (a tuple, a feature map [1, C, H, W]): FID could not be computed on it, and would fail only after sampling."""
    if isinstance(probe, torch.Tensor) and probe.dim() == 2 and probe.shape[0] == 1 and probe.shape[1] > 0:
        return int(probe.shape[1])
    shape = f"a tensor of shape {list(probe.shape)}" if isinstance(probe, torch.Tensor) else f"a {type(probe).__name__}"
    raise UserError(f"{path} returns {shape} for one image, not a vector of features; pass {WHAT_TO_PASS}")
