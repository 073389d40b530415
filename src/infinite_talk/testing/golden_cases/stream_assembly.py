"""Golden component `stream_assembly`: chunk bookkeeping of the streaming loop (infinite_talk.sampling.windows)."""

from __future__ import annotations

import torch

from infinite_talk.sampling.windows import plan_chunks


def run(case) -> dict[str, torch.Tensor]:
    meta = case.meta
    inputs = case.inputs()
    lens = [int(inputs[f"embedding_person{p + 1}"].shape[0]) for p in range(int(meta["num_persons"]))]
    if "audio_len" in meta and list(meta["audio_len"]) != lens:
        raise AssertionError(f"audio_len {meta['audio_len']} != embedding lengths {lens}")
    plan = plan_chunks(lens, max_frames=int(meta["max_frames_num"]), frame_num=int(meta["frame_num"]),
                       motion_frames=int(meta["motion_frame"]))
    n = plan.num_chunks
    return {
        "output_frame_source": plan.output_frame_source().float(),
        "chunk_ref_frame_index": torch.tensor([plan.keyframe_index(k) for k in range(n)], dtype=torch.float32),
        "chunk_motion_frames": torch.tensor([plan.motion_frames_for(k) for k in range(n)], dtype=torch.float32),
        "num_chunks": torch.tensor([n], dtype=torch.float32),
    }
