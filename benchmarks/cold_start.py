"""Cold start: the first compiled transformer forward in a fresh process, then again in a second process that finds
the compile cache the first one left (models/compilation.py), at the real shapes with random weights.

    python benchmarks/cold_start.py --quantization fp8-compute --attention fa3_fwd --out cold.json     # GPU
    python benchmarks/cold_start.py --config tiny --device cpu --no-compile                          # smoke test

Each process reports: building the model (random weights, quantization), the first forward (Dynamo tracing,
Inductor compilation or cache loads, the run), the second forward (the warm time), the Dynamo graph count, graph
breaks and recompiles (counted in Dynamo's logs), Dynamo/Inductor compile time, and the compiled output's rel-L2
against the same model run eagerly. The cache directory starts empty (a fresh temporary folder unless --cache is given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()
# the compile phases (Dynamo's compile_times) that say where a first forward's seconds go
MAIN_PHASES = {"_compile.compile_inner", "bytecode_tracing", "create_aot_dispatcher_function", "compile_fx_inner",
               "GraphLowering.run", "GraphLowering.codegen", "async_compile.wait", "PyCodeCache.load_by_key_path",
               "build_guards"}


def child(args) -> dict:
    import torch

    from dit_forward import build_model, device_name, grid, make_inputs, timed
    from infinite_talk.models.compilation import compile_blocks
    from infinite_talk.models.configs import GEOMETRIES

    device = torch.device(args.device)
    cfg = GEOMETRIES[args.config].dit
    frames, lat_h, lat_w = grid(args.config, args.size)
    t = time.perf_counter()
    model = build_model(cfg, device, torch.bfloat16, args.attention, args.quantization, layers=args.layers)
    build_s = time.perf_counter() - t
    if args.compile:
        compile_blocks(model)
    inputs = make_inputs(cfg, device, frames, lat_h, lat_w)
    with torch.inference_mode():
        first = timed(lambda: model(**inputs), device, 1)[0]
        second = timed(lambda: model(**inputs), device, 1)[0]
        check = {}
        if args.compile:  # the compiled forward against the same model run eagerly (Dynamo bypassed)
            compiled = model(**inputs).float()
            with torch.compiler.set_stance("force_eager"):
                eager = model(**inputs).float()
            check = {"rel_l2_compiled_vs_eager": round(float((compiled - eager).norm() / eager.norm()), 5)}
    from torch._dynamo.utils import compile_times, counters

    print(compile_times(repr="str"), file=sys.stderr, flush=True)
    names, values = compile_times(repr="csv", aggregate=True)
    caches = {f"{group}.{key}": n for group in ("inductor", "aot_autograd") for key, n in counters[group].items()
              if "cache" in key}

    return {"device": device_name(device), "build_s": round(build_s, 2), "first_forward_s": round(first, 2),
            "second_forward_s": round(second, 3), "process_s": round(time.perf_counter() - START, 2),
            "dynamo_unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()), "layers": args.layers or cfg.num_layers, **check,
            "compile_times_s": {n: round(float(v), 2) for n, v in zip(names, values, strict=False)
                                if n in MAIN_PHASES or "autotun" in n or "benchmark" in n}, "caches": caches,
            "cache_dirs": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="14b")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attention", default="fa3_fwd")
    parser.add_argument("--quantization", default="fp8-compute")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--layers", type=int, help="build only this many transformer blocks (diagnosis)")
    parser.add_argument("--cache", help="compile cache folder (default: a fresh temporary one)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    cache = args.cache or tempfile.mkdtemp(prefix="it-compile-")
    env = {**os.environ, "INFINITE_TALK_CACHE": cache, "TORCH_LOGS": "recompiles,graph_breaks"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TRITON_CACHE_DIR", None)
    runs = []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            runs.append({"process": i + 1, "error": (proc.stderr or proc.stdout)[-1500:]})
        else:
            logged = {"logged_recompiles": proc.stderr.count("Recompiling function"),
                      "logged_graph_breaks": proc.stderr.count("Graph break")}
            runs.append({"process": i + 1, "wall_s": round(wall, 2), **json.loads(lines[-1][7:]), **logged})
        print(runs[-1], flush=True)
    result = {"config": args.config, "size": args.size, "attention": args.attention,
              "quantization": args.quantization, "compile": args.compile, "runs": runs}
    from dit_forward import report

    report(result, args.out)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
