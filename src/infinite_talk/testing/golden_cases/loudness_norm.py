"""Golden: reference `loudness_norm` through `infinite_talk.media.audio.loudness_normalize`."""

from __future__ import annotations

import torch

from ...media.audio import loudness_normalize


def run(case) -> dict[str, torch.Tensor]:
    wave = case.inputs()["waveform"].numpy()
    out = loudness_normalize(wave, sample_rate=case.meta["sample_rate"], target=case.meta["target_lufs"])
    return {"waveform": torch.from_numpy(out)}
