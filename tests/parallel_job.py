"""Run by tests/test_parallel.py under `torchrun --nproc-per-node 2` (gloo, CPU); not a test module itself.

    parallel_job.py forward OUT.json    the tiny transformer, single-process and sequence-parallel forwards in each
                                        process, for several splits / token grids / speaker counts: rel-L2 per case
    parallel_job.py pipeline OUT.npy IMAGE AUDIO AUDIO2
                                        rank 0 runs InfiniteTalkPipeline.generate (two speakers, TeaCache skipping
                                        every step after its warm-up) and saves the raw uint8 frames and the sidecar;
                                        the other process runs the follower
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.parallel.sequence import SequenceParallel
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state

# (name, speakers, ulysses, ring, latent frames, latent h, latent w): tokens per frame = h/2 * w/2
FORWARD_CASES = [
    ("ulysses, even slices cutting frame 1", 1, 2, 1, 3, 4, 12),  # 36 tokens: 18 | 18, frames of 12
    ("ulysses, two speakers, cut", 2, 2, 1, 3, 4, 12),
    ("ulysses, unequal slices", 1, 2, 1, 3, 6, 10),  # 45 tokens: 23 | 22, frames of 15
    ("ulysses, two speakers, unequal", 2, 2, 1, 3, 6, 10),
    ("ulysses, two speakers, first frame on both", 2, 2, 1, 1, 4, 12),  # 12 tokens: the first frame is cut
    ("ring, cut", 1, 1, 2, 3, 4, 12),
    ("ring, two speakers, unequal", 2, 1, 2, 3, 6, 10),
]


def tiny_model() -> InfiniteTalkTransformer:
    model = InfiniteTalkTransformer.from_dit_config(GEOMETRY_TINY.dit)
    model.load_state_dict(random_transformer_state(GEOMETRY_TINY, seed=5))
    with torch.no_grad():  # sharper attention than the default init, so a misplaced token shows
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
    model.set_attention_backend("native")
    return model.eval()


def inputs_for(speakers: int, frames: int, h: int, w: int) -> dict:
    inputs = random_transformer_inputs(GEOMETRY_TINY, persons=speakers, frames=frames, h=h, w=w, seed=3)
    masks = torch.zeros(3, h, w)
    masks[0, :, : w // 2] = 1  # speaker 1 left, speaker 2 right, background the top rows
    masks[1, :, w // 2:] = 1
    masks[2, :2] = 1
    inputs["ref_target_masks"] = masks
    return inputs


def forward_cases(out: str) -> None:
    dist.init_process_group("gloo")
    results = {}
    for name, speakers, ulysses, ring, frames, h, w in FORWARD_CASES:
        model = tiny_model()
        inputs = inputs_for(speakers, frames, h, w)
        with torch.inference_mode():
            reference = model(**inputs)
            SequenceParallel(ulysses, ring, "cpu").attach(model)
            parallel = model(**inputs)
        results[name] = float((parallel - reference).norm() / reference.norm())
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


def pipeline_run(out: str, image: str, audio: str, audio2: str) -> int:
    from infinite_talk.follower import run_follower
    from infinite_talk.options import LoadOptions
    from infinite_talk.parallel.launch import world_from_env
    from infinite_talk.pipeline import InfiniteTalkPipeline

    load = LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32")
    world = world_from_env()
    if not world.is_leader:
        return run_follower(lambda: load, world)
    pipe = InfiniteTalkPipeline()
    frames = []
    try:
        pipe.load_models(load)
        result = pipe.generate(pipeline_request(image, audio, audio2, out.replace(".npy", ".mp4")),
                               on_chunk=lambda k, f: frames.append(np.array(f)))
    finally:
        pipe.release_processes()
    np.save(out, np.concatenate(frames))
    with open(out.replace(".npy", ".json"), "w") as fh:
        json.dump(result.sidecar, fh, default=str)
    return 0


def pipeline_request(image: str, audio: str, audio2: str, out: str):
    """Two chunks, two speakers, 8 steps of 1 pass; TeaCache with the default threshold, which the caller raises
    (`skip_after_warmup`) so that every step after the warm-up skips the blocks on every process."""
    from infinite_talk.options import GenerateOptions

    return GenerateOptions(image=image, audio=audio, audio2=audio2, steps=8, text_scale=1.0, audio_scale=1.0,
                           seed=11, step_cache="teacache", frame_num=41, motion_frames=5, out=out)


def skip_after_warmup() -> None:
    """The tiny model's timestep embedding changes too much per step for any threshold the option allows (<= 1)."""
    from infinite_talk.sampling import step_cache

    step_cache.DEFAULT_THRESHOLD["teacache"] = 1e9


if __name__ == "__main__":
    if sys.argv[1] == "forward":
        forward_cases(sys.argv[2])
    else:
        skip_after_warmup()
        sys.exit(pipeline_run(*sys.argv[2:6]))
