"""The two-speaker first-frame map computed the plain way, as a reference for the fused one
(`models.transformer.first_frame_attention_map`) in tests and benchmarks."""

from __future__ import annotations

import torch


def first_frame_map_per_head(query: torch.Tensor, ref_key: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Dense float32 attention probabilities per head, averaged over each speaker's mask and the heads:
    [speakers, tokens]."""
    masks = masks.float()
    total = 0
    for h in range(query.shape[2]):
        probs = (query[0, :, h].float() * query.shape[-1] ** -0.5 @ ref_key[0, :, h].float().T).softmax(-1)
        total = total + probs @ masks.T / masks.sum(-1)
    return (total / query.shape[2]).T
