"""Latent Consistency Models (Luo et al. 2023, arXiv:2310.04378) as a library and the `lcm` CLI."""

__version__ = "0.1.0"

from latent_consistency.errors import UserError

__all__ = ["UserError", "__version__"]
