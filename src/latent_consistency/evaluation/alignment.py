"""Prompt alignment: how much of its prompt a generated image shows, read by the judge.

The toy world's stand-in for the paper's CLIP score (Section 5.1 of Luo et al. 2023): per attribute,
the fraction of images whose judged value equals the prompt's, and their mean.
"""

from __future__ import annotations

import torch

from latent_consistency.evaluation.judge import Judge, attribute_accuracy


def prompt_alignment(judge: Judge, images: torch.Tensor, attributes: list, batch_size: int = 256) -> dict[str, float]:
    """Per attribute, the fraction of `images` showing the attribute of their prompt; "mean" averages them."""
    scores = attribute_accuracy(judge, images, attributes, batch_size)
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores
