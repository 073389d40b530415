"""Seconds per InfiniteTalk transformer forward, sequence-parallel over the N processes of a torchrun job, against one
GPU of the same machine; optionally one whole chunk (`--chunk`) through the product's ChunkLoop with rank 0 leading.

    torchrun --nproc-per-node 2 benchmarks/parallel_forward.py --out parallel_x2.json            # 480p, bf16, cuDNN
    torchrun --nproc-per-node 2 benchmarks/parallel_forward.py --attention fa3_fwd --quantization fp8-compute \
        --chunk --steps 4 --text-scale 1 --audio-scale 1 --out parallel_fast_x2.json             # fast mode chunk
    torchrun --nproc-per-node 2 benchmarks/parallel_forward.py --device cpu --config tiny          # smoke test

Random weights (speed does not depend on their values), the same on every process. Rank 0 first times the plain
single-process forward (and chunk) while the others wait, then every process runs the sequence-parallel one; rank 0
reports both medians (CUDA events), the scaling efficiency t1 / (N · tN), the rel-L2 of the parallel output against
the single-process one, the card name and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dit_forward import build_model, device_name, grid, make_inputs, model_arguments, peak_gib, report, timed
from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.parallel.launch import world_from_env
from infinite_talk.parallel.sequence import SequenceParallel

WAIT = timedelta(minutes=60)  # the others wait while rank 0 times the single-process baseline (a chunk: minutes)


def chunk_seconds(model, geometry, device, args, peers=None) -> dict:
    """Two chunks through ChunkLoop (random VAE and CLIP, as benchmarks/chunk.py); the second one is timed."""
    from chunk import RandomClip, random_vae

    from infinite_talk.sampling.guidance import passes_for
    from infinite_talk.sampling.loop import ChunkLoop, Conditioning
    from infinite_talk.sampling.schedules import make_sampler
    from infinite_talk.sampling.windows import FPS, plan_chunks

    cfg = geometry.dit
    frames, lat_h, lat_w = grid(args.config, args.size)
    frame_num = 4 * (frames - 1) + 1
    vae = random_vae(geometry, device, torch.bfloat16)
    if device.type == "cuda":
        vae.use_channels_last()
    clip = RandomClip(geometry, device, torch.float16 if device.type == "cuda" else torch.float32)
    g = torch.Generator().manual_seed(0)
    motion = 9 if frame_num > 9 else 5
    plan = plan_chunks(2 * frame_num - motion, None, frame_num, motion)
    keyframe = torch.rand(1, 3, 1, lat_h * 8, lat_w * 8, generator=g) * 2 - 1
    cond = Conditioning(
        prompt_context=torch.randn(40, cfg.text_dim, generator=g),
        negative_context=torch.randn(60, cfg.text_dim, generator=g),
        audio_embeddings=[torch.randn(plan.audio_lens[0], cfg.audio_layers, cfg.audio_dim, generator=g)],
        person_masks=torch.ones(3, lat_h // 2, lat_w // 2), keyframe=lambda k: ("image", keyframe),
        color_reference=None,
    )
    loop = ChunkLoop(model, vae, clip, lambda: make_sampler("euler", args.steps, 7.0), text_scale=args.text_scale,
                     audio_scale=args.audio_scale, device=device, peers=peers)
    marks = []

    def on_frames(k, video):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), dict(loop.stats.seconds), loop.stats.model_calls, video.shape[1]))

    with torch.inference_mode():
        loop.run(plan, cond, torch.Generator().manual_seed(0), on_frames=on_frames)
    (t0, s0, c0, _), (t1, s1, c1, new_frames) = marks
    return {"chunk_s": round(t1 - t0, 3), "stages_s": {k: round(s1[k] - s0[k], 3) for k in s1},
            "model_calls": c1 - c0, "new_frames": new_frames,
            "real_time_factor": round((t1 - t0) / (new_frames / FPS), 3),
            "passes_per_step": len(passes_for(args.text_scale, args.audio_scale))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser, None, "diffusers attention backend name, or one of ours (fa3_fwd, sageattn3); Ulysses "
                    "runs around any, ring needs one returning the log-sum-exp (default: _native_cudnn on CUDA, "
                    "native on the CPU)")
    parser.add_argument("--speakers", type=int, choices=[1, 2], default=1)
    parser.add_argument("--ulysses", type=int, help="default: the number of processes / ring")
    parser.add_argument("--ring", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-single", action="store_true", help="skip the single-process baseline on rank 0")
    parser.add_argument("--chunk", action="store_true", help="also time a whole chunk (single, then parallel)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-scale", type=float, default=1.0)
    parser.add_argument("--audio-scale", type=float, default=1.0)
    parser.add_argument("--out")
    args = parser.parse_args()

    world = world_from_env()
    if args.device.startswith("cuda"):
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=WAIT)
    else:
        device = torch.device(args.device)
        dist.init_process_group("gloo", timeout=WAIT)
    ulysses = args.ulysses or world.size // args.ring
    args.attention = args.attention or ("_native_cudnn" if device.type == "cuda" else "native")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    geometry = GEOMETRIES[args.config]
    cfg = geometry.dit
    frames, lat_h, lat_w = grid(args.config, args.size)
    model = build_model(cfg, device, dtype, args.attention, args.quantization)  # same seed: same weights everywhere
    if args.compile:
        for block in model.blocks:
            block.compile()
    inputs = make_inputs(cfg, device, frames, lat_h, lat_w, args.speakers)
    leader = world.rank == 0
    result = {"device": device_name(device), "processes": world.size, "ulysses": ulysses, "ring": args.ring,
              "backend": dist.get_backend(), "config": args.config, "size": args.size, "dtype": args.dtype,
              "attention": args.attention, "quantization": args.quantization, "compile": args.compile,
              "speakers": args.speakers, "tokens": frames * (lat_h // 2) * (lat_w // 2), "torch": torch.__version__}

    single = None
    if leader and not args.no_single:  # the others wait at the barrier below
        with torch.inference_mode():
            single_first = timed(lambda: model(**inputs), device, 1)[0]
            single_runs = timed(lambda: model(**inputs), device, args.iters)
            single = model(**inputs).float()
        result.update(single_first_call_s=round(single_first, 4), single_runs_s=[round(r, 4) for r in single_runs],
                      single_seconds_per_forward=round(statistics.median(single_runs), 4))
        if args.chunk:
            result["single_chunk"] = chunk_seconds(model, geometry, device, args)
    dist.barrier()

    SequenceParallel(ulysses, args.ring, device).attach(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first = timed(lambda: model(**inputs), device, 1)[0]
        runs = timed(lambda: model(**inputs), device, args.iters)
        parallel = model(**inputs).float()
    seconds = statistics.median(runs)
    every = [None] * world.size
    dist.all_gather_object(every, {"median_s": round(seconds, 4), "peak_memory_gib": peak_gib(device)})
    result.update(first_call_s=round(first, 4), runs_s=[round(r, 4) for r in runs],
                  seconds_per_forward=round(seconds, 4), per_process=every)
    if single is not None:
        t1 = result["single_seconds_per_forward"]
        result["speedup"] = round(t1 / seconds, 3)
        result["scaling_efficiency"] = round(t1 / (world.size * seconds), 3)
        result["parity_rel_l2_vs_single"] = float((parallel - single).norm() / single.norm())

    if args.chunk:
        from infinite_talk.parallel.peers import Leader, follow

        if leader:
            peers = Leader(world, model.sequence_parallel)
            try:
                result["chunk"] = chunk_seconds(model, geometry, device, args, peers)
            finally:
                peers.close()
            if "single_chunk" in result:
                t1, tn = result["single_chunk"]["chunk_s"], result["chunk"]["chunk_s"]
                result["chunk_speedup"] = round(t1 / tn, 3)
                result["chunk_scaling_efficiency"] = round(t1 / (world.size * tn), 3)
        else:
            follow(model, device)
    if leader:
        report(result, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
