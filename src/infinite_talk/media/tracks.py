"""The speakers' audio as `generate` uses it: one 16 kHz model track per speaker, and the soundtrack to mux.

Two speakers (docs/REFERENCE.md D6): `para` pads the shorter track (both speak over the same time), `add` puts
speaker 2 after speaker 1, each silent while the other speaks; the soundtrack is their mono mix at 16 kHz.
"""

from __future__ import annotations

import numpy as np

from ..options import GenerateOptions
from .audio import load_audio, load_audio_original, loudness_normalize
from .mp4 import soundtrack_rate
from .request_check import CheckedRequest


def speaker_tracks(request: GenerateOptions, checked: CheckedRequest
                   ) -> tuple[list[np.ndarray], tuple[np.ndarray, int], dict]:
    """16 kHz loudness-normalised model tracks per person, the soundtrack to mux (1 or 2 channels at a rate AAC
    takes), and what became of the soundtrack (for the sidecar)."""
    paths = [request.audio] + ([request.audio2] if request.audio2 else [])
    raw = [load_audio(p) for p in paths]
    tracks = [loudness_normalize(w) for w in raw]
    if len(tracks) == 1:
        info = checked.audio[0]
        samples, rate = load_audio_original(request.audio, soundtrack_rate(info.rate))
        record = {"source_channels": info.channels, "source_rate": info.rate, "channels": samples.shape[0],
                  "rate": rate}
        if info.channels > 2:
            record["note"] = f"{info.channels} channels averaged to mono (as the model hears them)"
        if rate != info.rate:
            record["rate_note"] = f"resampled from {info.rate} Hz: AAC does not take that rate"
        return tracks, (samples, rate), record
    a, b = tracks
    ra, rb = raw
    if request.audio_mode == "para":  # D6: pad the shorter track instead of failing
        n = max(len(a), len(b))
        tracks = [np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))]
        mix = np.pad(ra, (0, n - len(ra))) + np.pad(rb, (0, n - len(rb)))
    else:  # add: speaker 1 then speaker 2, each silent while the other speaks
        tracks = [np.concatenate([a, np.zeros_like(b)]), np.concatenate([np.zeros_like(a), b])]
        mix = np.concatenate([ra, rb])
    peak = float(np.abs(mix).max()) if mix.size else 0.0
    if peak > 1.0:
        mix = mix / peak
    record = {"source_channels": [a.channels for a in checked.audio], "channels": 1, "rate": 16000,
              "note": f"the two speakers mixed to mono at 16 kHz ({request.audio_mode})"}
    return tracks, (mix[None].astype(np.float32), 16000), record
