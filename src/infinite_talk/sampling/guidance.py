"""Classifier-free guidance over the text and audio conditions (docs/REFERENCE.md §3.5, docs/OPTIONS.md §2.4).

Passes (each one model call per step):

* ``cond``       — prompt, audio
* ``drop_text``  — negative prompt, audio
* ``uncond``     — negative prompt, zero audio (one person)
* ``drop_audio`` — prompt, zero audio (one person)

Pass rule: text scale ≠ 1 → 3 passes (cond, drop_text, uncond); text scale = 1 and audio scale ≠ 1 → 2 passes
(cond, drop_audio); both = 1 → 1 pass (cond; not in the reference, which always runs ≥ 2).

APG (adaptive projected guidance): each guidance difference goes through a momentum buffer (momentum −0.75), is
scaled down to an L2 norm of at most 55, and only its component orthogonal to the conditional prediction is kept.
Buffers live in an `APGState`, one per chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from infinite_talk.errors import OptionError

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 55.0


def _is_one(scale: float) -> bool:
    return math.isclose(float(scale), 1.0)


def passes_for(text_scale: float, audio_scale: float) -> list[str]:
    """The model passes needed per step for these guidance scales."""
    for name, value in (("text_scale", text_scale), ("audio_scale", audio_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise OptionError(f"option '{name}' must be a number of at least 0 (1 = no guidance), got {value!r}",
                              option=name, value=value)
    if not _is_one(text_scale):
        return ["cond", "drop_text", "uncond"]
    if not _is_one(audio_scale):
        return ["cond", "drop_audio"]
    return ["cond"]


class MomentumBuffer:
    """Running average `buf = diff + momentum·buf` (starts at 0)."""

    def __init__(self, momentum: float = APG_MOMENTUM):
        self.momentum = momentum
        self.average: torch.Tensor | None = None

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.average = diff if self.average is None else diff + self.momentum * self.average
        return self.average


@dataclass
class APGState:
    """Momentum buffers of one chunk (fresh per chunk), one for the text and one for the audio difference."""

    momentum: float = APG_MOMENTUM
    norm_threshold: float = APG_NORM_THRESHOLD
    text: MomentumBuffer = field(init=False)
    audio: MomentumBuffer = field(init=False)

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.text = MomentumBuffer(self.momentum)
        self.audio = MomentumBuffer(self.momentum)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    # norms over the whole prediction of one sample: C,T,H,W (the last four dimensions, or all if fewer)
    return list(range(max(0, x.ndim - 4), x.ndim))


def apg(diff: torch.Tensor, pred_cond: torch.Tensor, buffer: MomentumBuffer | None,
        norm_threshold: float = APG_NORM_THRESHOLD) -> torch.Tensor:
    """One APG-filtered guidance difference (eta = 0: the part parallel to `pred_cond` is dropped)."""
    if buffer is not None:
        diff = buffer.update(diff)
    dims = _reduce_dims(diff)
    if norm_threshold > 0:
        norm = torch.linalg.vector_norm(diff, ord=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    d64 = diff.double()
    unit = torch.nn.functional.normalize(pred_cond.double().flatten(dims[0]), dim=-1).view(pred_cond.shape)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    return (d64 - parallel).to(diff.dtype)


def combine(preds: dict[str, torch.Tensor], text_scale: float, audio_scale: float,
            apg_state: APGState | None = None) -> torch.Tensor:
    """The guided prediction from the passes `passes_for(text_scale, audio_scale)` (extra passes are ignored).

    3 passes: uncond + s_t·(cond − drop_text) + s_a·(drop_text − uncond)
    2 passes: drop_audio + s_a·(cond − drop_audio)
    1 pass:   cond
    With APG (3 passes): cond + (s_t−1)·APG(cond − drop_text) + (s_a−1)·APG(drop_text − uncond);
    (2 passes): cond + (s_a−1)·APG(cond − drop_audio).
    """
    needed = passes_for(text_scale, audio_scale)
    missing = [p for p in needed if p not in preds]
    if missing:
        raise ValueError(f"guidance needs passes {needed}; missing {missing}")
    cond = preds["cond"]
    if needed == ["cond"]:
        return cond
    if len(needed) == 3:
        drop_text, uncond = preds["drop_text"], preds["uncond"]
        if apg_state is None:
            return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
        text_diff = apg(cond - drop_text, cond, apg_state.text, apg_state.norm_threshold)
        audio_diff = apg(drop_text - uncond, cond, apg_state.audio, apg_state.norm_threshold)
        return cond + (text_scale - 1) * text_diff + (audio_scale - 1) * audio_diff
    drop_audio = preds["drop_audio"]
    if apg_state is None:
        return drop_audio + audio_scale * (cond - drop_audio)
    audio_diff = apg(cond - drop_audio, cond, apg_state.audio, apg_state.norm_threshold)
    return cond + (audio_scale - 1) * audio_diff
