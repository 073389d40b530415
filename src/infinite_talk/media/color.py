"""Colour correction of decoded chunks against a reference frame (docs/REFERENCE.md §3.7).

Every frame is converted to CIE Lab (skimage), each L/a/b channel is given the mean and standard deviation of the
reference frame's channel (`(c − μ)·σ_ref/σ + μ_ref`; a flat channel takes μ_ref), converted back, clipped, and
blended with the input by `strength` (0 = untouched, 1 = fully corrected).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from skimage.color import lab2rgb, rgb2lab

from infinite_talk.errors import OptionError


def _to_thwc01(x: torch.Tensor) -> np.ndarray:
    """[3,T,H,W] or [1,3,T,H,W] or [3,H,W] in [−1,1] → float64 [T,H,W,3] in [0,1]."""
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"expected a batch of 1, got {tuple(x.shape)}")
        x = x[0]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"expected an RGB video [3,T,H,W], got {tuple(x.shape)}")
    arr = ((x.detach().to(torch.float64).cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return arr.permute(1, 2, 3, 0).numpy()


class ColorMatcher:
    """Lab statistics of a reference frame, applied to any number of chunks."""

    def __init__(self, reference: torch.Tensor):
        ref = _to_thwc01(reference)[0]
        lab = rgb2lab(ref)
        self.mean = lab.reshape(-1, 3).mean(axis=0)
        self.std = lab.reshape(-1, 3).std(axis=0)

    def __call__(self, video: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return color_correct(video, self, strength)


def color_correct(video: torch.Tensor, reference: torch.Tensor | ColorMatcher, strength: float = 1.0) -> torch.Tensor:
    """Match every frame of `video` ([3,T,H,W] or [1,3,T,H,W] in [−1,1]) to `reference` (a [3,H,W] /
    [1,3,1,H,W] frame in [−1,1], or a ColorMatcher). Same shape and dtype out; strength 0 returns `video` itself."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise OptionError(f"option 'color_correction' must be between 0 (off) and 1 (full), got {strength!r}",
                          option="color_correction", value=strength)
    if strength == 0:
        return video
    matcher = reference if isinstance(reference, ColorMatcher) else ColorMatcher(reference)
    src = _to_thwc01(video)  # [T,H,W,3]
    lab = rgb2lab(src)
    mu = lab.mean(axis=(1, 2), keepdims=True)
    sd = lab.std(axis=(1, 2), keepdims=True)
    ref_mu = matcher.mean.reshape(1, 1, 1, 3)
    ref_sd = matcher.std.reshape(1, 1, 1, 3)
    flat = sd == 0
    matched = np.where(flat, ref_mu, (lab - mu) * (ref_sd / np.where(flat, 1.0, sd)) + ref_mu)
    with warnings.catch_warnings():  # out-of-gamut Lab values are clipped below, as the reference does
        warnings.simplefilter("ignore", UserWarning)
        corrected = np.clip(lab2rgb(matched), 0.0, 1.0)
    out = (1.0 - strength) * src + strength * corrected
    result = torch.from_numpy(out * 2.0 - 1.0).permute(3, 0, 1, 2).to(video.dtype)
    return result[None] if video.ndim == 5 else result
