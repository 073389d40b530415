"""Golden component `audio_windows`: per-chunk audio windows (infinite_talk.sampling.windows)."""

from __future__ import annotations

import torch

from infinite_talk.sampling.windows import plan_chunks


def _embeddings(case) -> list[torch.Tensor]:
    inputs = case.inputs()
    return [inputs[f"embedding_person{p + 1}"] for p in range(int(case.meta["num_persons"]))]


def _plan(case, embeddings):
    meta = case.meta
    plan = plan_chunks([e.shape[0] for e in embeddings], max_frames=int(meta["max_frames_num"]),
                       frame_num=int(meta["frame_num"]), motion_frames=int(meta["motion_frame"]))
    return plan


def run(case) -> dict[str, torch.Tensor]:
    meta = case.meta
    embeddings = _embeddings(case)
    plan = _plan(case, embeddings)
    k = int(meta["chunk_index"])
    checks = {
        "num_chunks": (plan.num_chunks, meta.get("num_chunks")),
        "audio_start": (plan.audio_starts[k], meta.get("audio_start")),
        "audio_end": (plan.audio_end(k), meta.get("audio_end")),
        "is_last_chunk": (plan.is_last(k), meta.get("is_last_chunk")),
    }
    for key, (ours, theirs) in checks.items():
        if theirs is not None and ours != theirs:
            raise AssertionError(f"{key}: ours {ours} != reference {theirs}")
    return {"windows": plan.window(k, embeddings)}
