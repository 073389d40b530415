"""Loading speed of the transformer from the released shard layout on local disk, random weights, through the
product's own `load_transformer` (+ `quantize_transformer` for a quantized mode).

    python benchmarks/load_speed.py --folder /tmp/ckpt --quantization fp8-compute,disabled --out load.json   # GPU
    python benchmarks/load_speed.py --config tiny --device cpu --folder /tmp/tiny_ckpt                       # smoke test

The checkpoint is written first when the folder has none: `Wan2.1-I2V-14B-480P/` with config.json, seven shards
`diffusion_pytorch_model-0000N-of-00007.safetensors` (original Wan names, bf16) and their index JSON, plus the
InfiniteTalk adapter file `InfiniteTalk/single/infinitetalk.safetensors`. Each mode is loaded twice: once after
dropping the page cache (`--drop-caches`, needs root; the disk is read) and once with the files cached (host memory
is read). Reports seconds for reading + building the model, for quantizing and placing it on the device, and the
effective rate: checkpoint bytes / total seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from dit_forward import device_name, report
from infinite_talk.models.configs import GEOMETRIES
from infinite_talk.models.quantize import quantize_transformer
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.models.transformer_loading import (
    load_transformer,
    split_base_and_adapter,
    state_dict_in_original_layout,
)

SHARDS = 7


def write_checkpoint(folder: Path, geometry, device: torch.device) -> tuple[Path, Path, float]:
    """Random bf16 weights in the released layout (generated on `device`); returns (base, adapter, seconds)."""
    t = time.perf_counter()
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(geometry.dit)
    shapes = state_dict_in_original_layout({k: v.shape for k, v in model.state_dict().items()})
    base, adapter = split_base_and_adapter(shapes)
    base_dir = folder / "Wan2.1-I2V-14B-480P"
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "i2v",
                                                      "dim": geometry.dit.dim,
                                                      "num_layers": geometry.dit.num_layers}))

    def random(shape):
        return (torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    # Shards of about equal bytes, in key order (as released: whole blocks per shard, blocks in order).
    keys = list(base)
    total = sum(torch.Size(base[k]).numel() for k in keys)
    weight_map, shard, size, index = {}, [], 0, 1
    for i, key in enumerate(keys):
        shard.append(key)
        size += torch.Size(base[key]).numel()
        if size >= total * index / SHARDS or i == len(keys) - 1:
            name = f"diffusion_pytorch_model-{index:05d}-of-{SHARDS:05d}.safetensors"
            save_file({k: random(base[k]) for k in shard}, str(base_dir / name))
            weight_map.update({k: name for k in shard})
            shard, index = [], index + 1
    (base_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}))
    adapter_path = folder / "InfiniteTalk" / "single" / "infinitetalk.safetensors"
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: random(v) for k, v in adapter.items()}, str(adapter_path))
    return base_dir, adapter_path, time.perf_counter() - t


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_once(base, adapter, geometry, mode: str, device: torch.device) -> dict:
    """`loading.load_planned_transformer`'s placement: quantized modes load on the host and quantize layer by layer
    on the way to the device; unquantized ones load straight onto the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    model = load_transformer(base, adapter, geometry, dtype=torch.bfloat16,
                             device=device if mode == "disabled" else "cpu")
    read = time.perf_counter() - t
    quantize_transformer(model, mode, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - t
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"read_build_s": round(read, 2), "quantize_place_s": round(total - read, 2), "total_s": round(total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(GEOMETRIES), default="14b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", required=True, help="where the checkpoint is (written there when absent)")
    parser.add_argument("--quantization", default="fp8-compute,disabled", help="comma-separated modes")
    parser.add_argument("--drop-caches", action="store_true", help="also load once after dropping the page cache")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    geometry = GEOMETRIES[args.config]
    folder = Path(args.folder)
    base = folder / "Wan2.1-I2V-14B-480P"
    adapter = folder / "InfiniteTalk" / "single" / "infinitetalk.safetensors"
    write_s = None
    if not adapter.exists():
        base, adapter, write_s = write_checkpoint(folder, geometry, device)
    files = [*sorted(base.glob("*.safetensors")), adapter]
    size = sum(f.stat().st_size for f in files)
    rows = []
    for mode in args.quantization.split(","):
        for cached in ([False] if args.drop_caches else []) + [True]:
            dropped = None if cached else drop_page_cache()
            row = {"quantization": mode, "page_cache": "warm" if cached else "dropped", "dropped": dropped,
                   **load_once(base, adapter, geometry, mode, device)}
            row["effective_gb_s"] = round(size / 1e9 / row["total_s"], 2)
            rows.append(row)
            print(row, flush=True)
    report({"device": device_name(device), "config": args.config, "files": len(files),
            "checkpoint_gb": round(size / 1e9, 2), "write_s": None if write_s is None else round(write_s, 1),
            "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
