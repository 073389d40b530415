"""Resolve the load options against what this machine can run, before any weights load (docs/OPTIONS.md §4.2-4.3).

`resolve(load_options, caps)` returns a `Plan`: for each option `Resolved(requested, effective, reason)`, plus the
concrete choices the model code uses (device, dtypes, quantization mode, diffusers attention backend). An explicit
value that cannot run here raises `OptionError` with one line: `option=value: needs ...; this machine has ...`.
There is no silent fallback; `auto` picks the fastest *verified* choice and says what it skipped.

Decisions (documented here because they are product behaviour):
- model/vae precision bf16 and fp16 run on CPU (torch has CPU kernels for both; slow without native bf16/fp16
  instructions) and are kept as requested: the effective dtype is what runs. bf16 on a GPU below sm_80 is refused
  (no bf16 tensor cores: emulated and unsupported by the fused attention kernels).
- quantization=fp8 means fp8 e4m3 weights with per-row scales (torchao). It resolves to `fp8-compute` (fp8
  activations too, real fp8 GEMMs via torch._scaled_mm) on CUDA sm >= 8.9 with bf16/fp16 compute when torchao's
  fp8 micro-test passed, else to `fp8-storage` (weights stored in fp8, upcast to the compute dtype per layer: memory
  only). The plan says which, and why.
- quantization=nf4 uses torchao's NF4 tensor (the QLoRA format bitsandbytes also uses), which runs on CPU and GPU, so
  it is tested here; bitsandbytes is not used (CUDA-only kernels, not testable in CI).
- attention=auto never picks 8-bit/4-bit attention (sageattn, sageattn_3): their quality is not yet checked on the
  golden clip (docs/OPTIONS.md §2.6), so they run only when requested. Our Triton 8-bit kernels (sage8_triton:
  INT8 Q·K + FP8 P·V; sage8_triton_bf16pv: INT8 Q·K + BF16 P·V) run only when requested too: on an H200 at the 480p
  shape they are slower than FlashAttention-3 and miss the 0.03 attention-error gate on peaky attention
  (benchmarks/results/attention_sage8_h200.json). An explicit request runs where the probe's micro-test passed (GPU
  gate, Triton, accuracy), else is refused. Orders (fastest first, docs/PERFORMANCE.md §3, §8):
  Hopper: flash_attn_3 (flash_attn_interface, else the fa3-fwd wheel) > sdpa-cudnn > sdpa-flash > flash_attn_2 > sdpa-efficient > sdpa-math;
  Blackwell (no FA3 there): sdpa-cudnn > sdpa-flash > flash_attn_2 > ...;
  Ampere/Ada: sdpa-flash > flash_attn_2 > sdpa-cudnn > ... (inferred: cuDNN attention is only measured on Hopper).
- fp32 compute on CUDA uses SDPA's efficient kernel (cuDNN/flash/FA/Sage have no fp32 path), else math.
- On CPU, attention is SDPA backend "native": torch picks its CPU kernel (flash-CPU, else math).
- Sequence parallel (a torchrun job of N processes, parallel/): ulysses × ring must equal N, the heads must divide by
  ulysses; each process uses cuda:LOCAL_RANK (NCCL) or the CPU (gloo). Ulysses runs around every attention kernel;
  ring attention merges partial results by their log-sum-exp, which only some kernels return: `auto` then picks
  the fastest that does (the reason says what it skipped), an explicit kernel without it is refused. Outside a
  launcher ulysses/ring > 1 is refused (nothing would split).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError
from ..models.placement import Offload
from ..options import LoadOptions
from ..parallel.launch import World, world_from_env
from .memory import MemoryPlan, plan_memory
from .probe import BLACKWELL_SMS, Capabilities
from .resolved import Resolved

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# attention kernel id -> (diffusers dispatcher backend name, provider)
ATTENTION_BACKENDS: dict[str, tuple[str, str]] = {
    "sdpa-cudnn": ("_native_cudnn", "diffusers"),
    "sdpa-flash": ("_native_flash", "diffusers"),
    "sdpa-efficient": ("_native_efficient", "diffusers"),
    "sdpa-math": ("_native_math", "diffusers"),
    "sdpa-native": ("native", "diffusers"),
    "flash_attn_2": ("flash", "diffusers"),
    "flash_attn_3": ("_flash_3", "diffusers"),
    "fa3_fwd": ("fa3_fwd", "infinite_talk"),  # our processor around fa3_fwd_interface.flash_attn_func
    "sageattn": ("sage", "diffusers"),
    "sageattn_3": ("sageattn3", "infinite_talk"),  # our processor around sageattn3.sageattn3_blackwell
    "sage8_triton": ("sage8_triton", "infinite_talk"),  # our Triton kernel, models/int8_attention.py
    "sage8_triton_bf16pv": ("sage8_triton_bf16pv", "infinite_talk"),
}
# attention kernel id -> probe entry proving it runs
_PROBE_KEY = {"sdpa-cudnn": "sdpa_cudnn", "sdpa-flash": "sdpa_flash", "sdpa-efficient": "sdpa_efficient",
              "sdpa-math": "sdpa_math", "flash_attn_2": "flash_attn_2", "flash_attn_3": "flash_attn_3",
              "fa3_fwd": "fa3_fwd", "sageattn": "sageattn", "sageattn_3": "sageattn_3",
              "sage8_triton": "sage8_triton", "sage8_triton_bf16pv": "sage8_triton_bf16pv"}

NEEDS = {
    "flash_attn_2": "a CUDA GPU with sm >= 8.0, bf16/fp16 compute and flash-attn >= 2.6.3",
    "flash_attn_3": "a Hopper GPU (sm_90), bf16/fp16 compute and FlashAttention-3 (flash_attn_3 built from "
                    "hopper/, or the fa3-fwd wheel)",
    "sageattn": "a CUDA GPU with sm >= 8.0, bf16/fp16 compute and sageattention >= 2.1.1 (SageAttention2)",
    "sageattn_3": "a Blackwell GPU (sm_100/sm_120/sm_121), CUDA >= 12.8 and the sageattn3 package",
    "sage8_triton": "a CUDA GPU with sm >= 8.9 (fp8 tensor cores), bf16/fp16 compute and Triton",
    "sage8_triton_bf16pv": "a CUDA GPU with sm >= 8.0, bf16/fp16 compute and Triton",
    "nf4": "torchao >= 0.15 (NF4 4-bit weights)",
    "fp8": "torchao >= 0.15 (fp8 weights) and torch float8_e4m3fn",
    "fp4": "a Blackwell GPU (sm_100/sm_120/sm_121) with torchao NVFP4 kernels and model_precision bf16",
    "int8": "torchao >= 0.15 (int8 weight-only)",
}


@dataclass(frozen=True)
class Plan:
    """What will run. `attention_backend` goes to `model.set_attention_backend()` when `attention_provider` is
    "diffusers"; for "infinite_talk" it names our own attention processor."""

    device: str  # "cpu" | "cuda:N"
    model_dtype: str  # torch dtype name: "bfloat16" | "float16" | "float32"
    vae_dtype: str
    quantization: str  # "disabled" | "fp8-compute" | "fp8-storage" | "int8-weight-only" | "nf4" | "nvfp4"
    t5_quantization: str  # "disabled" | "fp8-storage"
    attention_kernel: str  # key of ATTENTION_BACKENDS
    attention_backend: str
    attention_provider: str  # "diffusers" | "infinite_talk"
    compile: bool = False
    options: dict[str, Resolved] = field(default_factory=dict)
    machine: str = ""
    # memory plan (plan/memory.py): resolved offload setting, VAE tiling, encoders off the GPU after use, estimates
    offload: Offload = Offload()  # none | blocks:N | sequential, and how swapped blocks travel
    vae_tiling: bool = False
    encoders_offloaded: bool = False
    memory: MemoryPlan | None = None
    # sequence parallel (parallel/): processes of the torchrun job, their split, the torch.distributed backend
    world_size: int = 1
    ulysses: int = 1
    ring: int = 1
    dist_backend: str = ""  # "nccl" | "gloo" | "" (one process)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.model_dtype)

    @property
    def vae_torch_dtype(self):
        import torch

        return getattr(torch, self.vae_dtype)

    @property
    def transformer_load_device(self) -> str:
        """Where the transformer's weights are loaded: quantized or offloaded runs load on the CPU and quantize layer
        by layer on the way to the device (the device never holds the full-precision model), or stay in host memory
        until the offload hooks place their parts."""
        return self.device if self.quantization == "disabled" and not self.offload.swapping else "cpu"

    @property
    def encoder_device(self) -> str:
        """Where T5 and CLIP live: the host when the plan moves them off the GPU after use (they visit it to encode)."""
        return "cpu" if self.encoders_offloaded else self.device

    @property
    def t5_load_device(self) -> str:
        """An fp8 T5 is quantized in host memory, then moved: the GPU never holds its bf16 weights."""
        return "cpu" if self.t5_quantization != "disabled" else self.encoder_device

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON data (the sidecar's and the service's `load.effective`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["options"] = {k: v.to_dict() for k, v in self.options.items()}
        d["offload"] = str(self.offload)
        d["memory"] = self.memory.to_dict() if self.memory is not None else {}
        return d

    def lines(self) -> list[str]:
        """`option: requested → effective (reason)`, one per option."""
        return [f"{name}: {r.requested} → {r.effective} ({r.reason})" for name, r in self.options.items()]


# ---- helpers ---------------------------------------------------------------------------------------------------
def _refuse(option: str, value: str, needs: str, have: str) -> OptionError:
    return OptionError(f"{option}={value}: needs {needs}; this machine has {have}", option=option, value=value)


def _have(caps: Capabilities, device: str, probe_key: str | None = None) -> str:
    """What this machine/run offers, plus the probe's reason for `probe_key` when the GPU itself is not the issue."""
    text = caps.summary()
    if device == "cpu" and caps.gpu:
        text += ", but this run uses device=cpu"
    if probe_key:
        k = caps.kernel(probe_key)
        if not k.available and not k.reason.startswith("needs "):
            text += f"; {probe_key}: {k.reason}"
    return text


def _sm(caps: Capabilities, device: str) -> tuple[int, int] | None:
    return caps.gpu.capability if device != "cpu" and caps.gpu else None


def _ok(caps: Capabilities, key: str) -> bool:
    return caps.kernel(key).available


# ---- per option ------------------------------------------------------------------------------------------------
def _resolve_device(requested: str, caps: Capabilities, world: World | None = None) -> Resolved:
    if world is not None and world.size > 1 and requested != "cpu" and (requested != "auto" or caps.gpu):
        if requested not in ("auto", "cuda"):
            raise OptionError(f"device={requested}: in a torchrun job each process uses the GPU of its LOCAL_RANK; "
                              "use --device auto or cuda (or cpu)", option="device", value=requested)
        if world.local_rank >= caps.gpu_count:
            raise _refuse("device", requested, f"a GPU per process on this node (LOCAL_RANK {world.local_rank})",
                          f"{caps.gpu_count} CUDA GPU(s)")
        resolved = _resolve_device(f"cuda:{world.local_rank}", caps)
        return Resolved(requested, resolved.effective, f"{resolved.reason}; the GPU of LOCAL_RANK {world.local_rank}")
    if requested == "auto":
        if caps.gpu:
            return Resolved("auto", "cuda:0", f"CUDA GPU present: {caps.summary()}")
        return Resolved("auto", "cpu", "no CUDA GPU found")
    if requested == "cpu":
        return Resolved("cpu", "cpu", "requested")
    m = re.fullmatch(r"cuda(?::(\d+))?", requested)
    if not m:
        raise OptionError(f"device={requested}: unknown device; choose auto, cpu, cuda or cuda:N", option="device",
                          value=requested)
    index = int(m.group(1) or 0)
    if index >= caps.gpu_count:
        have = caps.summary() if caps.gpu_count else "no CUDA GPU (CPU only)"
        if caps.gpu_count:
            have = f"{caps.gpu_count} CUDA GPU(s) (cuda:0..cuda:{caps.gpu_count - 1}): {have}"
        raise _refuse("device", requested, f"CUDA GPU index {index}", have)
    gpu, probed = caps.gpus[index], caps.gpu
    if (gpu.name, gpu.capability) != (probed.name, probed.capability):
        raise OptionError(f"device={requested}: kernels were probed on cuda:{caps.probed_gpu} ({probed.name}, "
                          f"{probed.sm}) but cuda:{index} is {gpu.name} ({gpu.sm}); run with "
                          f"CUDA_VISIBLE_DEVICES={index} so the probe tests that GPU", option="device", value=requested)
    return Resolved(requested, f"cuda:{index}", f"{gpu.name} ({gpu.sm})")


def _resolve_precision(option: str, requested: str, caps: Capabilities, device: str) -> Resolved:
    sm = _sm(caps, device)
    if sm is None:  # CPU
        key = {"bf16": "cpu_bf16", "fp16": "cpu_fp16"}.get(requested)
        if key and not _ok(caps, key):
            raise _refuse(option, requested, f"torch {requested} CPU kernels", f"{_have(caps, device)}; "
                          f"{key}: {caps.kernel(key).reason}")
        reason = {
            "fp32": "fp32 on CPU",
            "bf16": "bf16 runs on CPU in torch" + (", with native bf16 instructions" if caps.cpu_native_bf16
                                                   else "; slow: this CPU has no native bf16 instructions"),
            "fp16": "fp16 runs on CPU in torch; slow: few CPU fp16 kernels",
        }[requested]
        return Resolved(requested, requested, reason)
    if requested == "bf16" and sm < (8, 0):
        raise _refuse(option, "bf16", "a GPU with sm >= 8.0 (Ampere or newer) for bf16 kernels; use fp16 or fp32",
                      _have(caps, device))
    return Resolved(requested, requested, f"{requested} on {device}, {caps.gpu.sm}")


def _resolve_quantization(requested: str, caps: Capabilities, device: str, precision: str) -> Resolved:
    sm = _sm(caps, device)
    if requested == "disabled":
        return Resolved("disabled", "disabled", f"transformer weights in {precision}")
    if requested == "fp8":
        if not _ok(caps, "torchao_fp8_wo"):
            raise _refuse("quantization", "fp8", NEEDS["fp8"], _have(caps, device, "torchao_fp8_wo"))
        storage = (f"fp8 e4m3 weights with per-row scales (torchao Float8WeightOnlyConfig), upcast to {precision} "
                   "per layer: weight storage only, saves memory, not time")
        if sm is None:
            return Resolved("fp8", "fp8-storage", f"{storage}; no fp8 matmuls on CPU")
        if sm < (8, 9):
            return Resolved("fp8", "fp8-storage",
                            f"{storage}; fp8 matmuls need sm >= 8.9 and this GPU is {caps.gpu.sm}")
        if precision == "fp32":
            return Resolved("fp8", "fp8-storage", f"{storage}; fp8 matmuls take bf16/fp16 activations, "
                                                  "model_precision is fp32")
        if not _ok(caps, "torchao_fp8_dynamic"):
            return Resolved("fp8", "fp8-storage", f"{storage}; fp8 matmuls unavailable: "
                                                  f"{caps.kernel('torchao_fp8_dynamic').reason}")
        return Resolved("fp8", "fp8-compute",
                        "fp8 e4m3 weights and activations with per-row scales, real fp8 matmuls (torchao "
                        f"Float8DynamicActivationFloat8WeightConfig, torch._scaled_mm) on {caps.gpu.sm}")
    if requested == "int8":
        if not _ok(caps, "torchao_int8_wo"):
            raise _refuse("quantization", "int8", NEEDS["int8"], _have(caps, device, "torchao_int8_wo"))
        return Resolved("int8", "int8-weight-only",
                        "torchao int8 weight-only, Int8WeightOnlyConfig: saves memory, not time")
    if requested == "nf4":
        if not _ok(caps, "torchao_nf4"):
            raise _refuse("quantization", "nf4", NEEDS["nf4"], _have(caps, device, "torchao_nf4"))
        return Resolved("nf4", "nf4", f"torchao NF4 4-bit weights (block 64), upcast to {precision} per layer: "
                                      "saves memory, not time")
    if requested == "fp4":
        if sm is None or sm not in BLACKWELL_SMS or not _ok(caps, "torchao_nvfp4"):
            raise _refuse("quantization", "fp4", NEEDS["fp4"],
                          _have(caps, device, "torchao_nvfp4" if sm in BLACKWELL_SMS else None))
        if precision != "bf16":
            raise OptionError(f"quantization=fp4: needs model_precision bf16 (NVFP4 quantizes bf16 weights); "
                              f"model_precision is {precision}", option="quantization", value="fp4")
        return Resolved("fp4", "nvfp4", f"torchao NVFP4 weights and activations on {caps.gpu.sm}")
    raise OptionError(f"quantization: unknown value {requested!r}", option="quantization", value=requested)


def _resolve_t5_quantization(requested: str, caps: Capabilities, device: str) -> Resolved:
    if requested == "disabled":
        return Resolved("disabled", "disabled", "umT5 weights in bf16 on GPU, fp32 on CPU")
    if not _ok(caps, "torchao_fp8_wo"):
        raise _refuse("t5_quantization", "fp8", NEEDS["fp8"], _have(caps, device, "torchao_fp8_wo"))
    return Resolved("fp8", "fp8-storage", "umT5 Linear weights in fp8 e4m3 with per-row scales (torchao "
                                          "Float8WeightOnlyConfig), upcast per layer: memory only")


def _resolve_compile(requested: bool, caps: Capabilities, device: str) -> Resolved:
    if not requested:
        return Resolved("off", "off", "eager PyTorch")
    if device == "cpu":
        raise _refuse("compile", "on", "a CUDA GPU with Triton (the compiled kernels are Triton GPU kernels)",
                      _have(caps, device))
    if not _ok(caps, "triton"):
        raise _refuse("compile", "on", "Triton", _have(caps, device, "triton"))
    return Resolved("on", "on", "torch.compile (inductor) per transformer block; the first forward of each "
                                "shape compiles, later ones reuse it")


def _attention_order(sm: tuple[int, int]) -> list[str]:
    if sm == (9, 0):
        return ["flash_attn_3", "fa3_fwd", "sdpa-cudnn", "sdpa-flash", "flash_attn_2", "sdpa-efficient", "sdpa-math"]
    if sm >= (9, 0):
        return ["sdpa-cudnn", "sdpa-flash", "flash_attn_2", "sdpa-efficient", "sdpa-math"]
    if sm >= (8, 0):
        return ["sdpa-flash", "flash_attn_2", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"]
    return ["sdpa-efficient", "sdpa-math"]


def _dtype_reason(k, dtype: str) -> str:
    """Why an available kernel does not run this dtype."""
    return f"its micro-test passed for {', '.join(k.dtypes)} only, not {dtype} ({k.reason})"


def _first_verified(candidates: list[str], caps: Capabilities, dtype: str) -> tuple[str | None, list[str]]:
    skipped = []
    for kernel in candidates:
        k = caps.kernel(_PROBE_KEY[kernel])
        if k.runs(dtype):
            return kernel, skipped
        skipped.append(f"{kernel}: {k.reason if not k.available else _dtype_reason(k, dtype)}")
    return None, skipped


def _resolve_attention(requested: str, caps: Capabilities, device: str, precision: str) -> tuple[Resolved, str]:
    """Returns (Resolved with the option-level effective value, kernel id)."""
    sm = _sm(caps, device)
    if sm is None:  # CPU: torch SDPA picks its CPU kernel
        if requested in ("auto", "sdpa"):
            if not (_ok(caps, "sdpa_math") or _ok(caps, "sdpa_flash")):
                raise _refuse("attention", requested, "a working torch SDPA",
                              f"{_have(caps, device)}; sdpa_math: {caps.kernel('sdpa_math').reason}")
            return Resolved(requested, "sdpa-native",
                            "torch SDPA on CPU, diffusers backend 'native': torch picks its CPU flash kernel, "
                            "else math"), "sdpa-native"

    fp32 = precision == "fp32"
    if requested in ("auto", "sdpa"):
        if fp32:
            order = ["sdpa-efficient", "sdpa-math"]
            why = "fp32 compute: cuDNN/flash kernels have no fp32 path"
        else:
            order = _attention_order(sm)
            if requested == "sdpa":
                order = [k for k in order if k.startswith("sdpa-")]
            why = f"fastest verified on {caps.gpu.sm} {precision}"
            if requested == "auto":
                why += ("; sageattn/sageattn_3 only when requested (8/4-bit quality not yet checked); sage8_triton/"
                        "sage8_triton_bf16pv only when requested (slower than FlashAttention-3 and SDPA on an H200, "
                        "and above the 0.03 rel-L2 attention gate on peaky attention)")
        kernel, skipped = _first_verified(order, caps, DTYPES[precision])
        if kernel is None:
            raise _refuse("attention", requested, "a working torch SDPA kernel",
                          f"{_have(caps, device)}; " + "; ".join(skipped))
        effective = "flash_attn_3" if kernel == "fa3_fwd" else kernel
        reason = f"{_describe(kernel)}; {why}"
        if skipped:
            reason += "; skipped " + "; ".join(skipped)
        return Resolved(requested, effective, reason), kernel

    # explicit external kernels: hardware, then dtype, then the probe (package + micro-test)
    if not _hw_ok(requested, sm):
        raise _refuse("attention", requested, NEEDS[requested], _have(caps, device))
    if fp32:
        raise OptionError(f"attention={requested}: needs model_precision bf16 or fp16 (the kernel has no fp32 "
                          "path); model_precision is fp32", option="attention", value=requested)
    candidates = ["flash_attn_3", "fa3_fwd"] if requested == "flash_attn_3" else [_PROBE_KEY[requested]]
    dtype = DTYPES[precision]
    for kernel in candidates:
        if caps.kernel(kernel).runs(dtype):
            return Resolved(requested, requested, _describe(kernel)), kernel
    if any(caps.kernel(c).available for c in candidates):
        why = "; ".join(f"{c}: {_dtype_reason(caps.kernel(c), dtype)}" for c in candidates if caps.kernel(c).available)
        raise OptionError(f"attention={requested}: does not run model_precision {precision} on this machine: {why}; "
                          "use model_precision bf16 or attention sdpa", option="attention", value=requested)
    have = _have(caps, device) + "".join(f"; {c}: {caps.kernel(c).reason}" for c in candidates)
    raise _refuse("attention", requested, NEEDS[requested], have)


def _hw_ok(requested: str, sm: tuple[int, int] | None) -> bool:
    if sm is None:
        return False
    return {"flash_attn_2": sm >= (8, 0), "flash_attn_3": sm == (9, 0), "sageattn": sm >= (8, 0),
            "sageattn_3": sm in BLACKWELL_SMS, "sage8_triton": sm >= (8, 9),
            "sage8_triton_bf16pv": sm >= (8, 0)}[requested]


def _describe(kernel: str) -> str:
    backend, provider = ATTENTION_BACKENDS[kernel]
    where = f"diffusers backend '{backend}'" if provider == "diffusers" else f"our '{backend}' processor"
    text = {
        "sdpa-cudnn": "torch SDPA cuDNN kernel",
        "sdpa-flash": "torch SDPA flash kernel",
        "sdpa-efficient": "torch SDPA memory-efficient kernel",
        "sdpa-math": "torch SDPA math kernel",
        "flash_attn_2": "FlashAttention-2 (flash-attn)",
        "flash_attn_3": "FlashAttention-3 (flash_attn_interface)",
        "fa3_fwd": "FlashAttention-3 forward (fa3-fwd wheel, fa3_fwd_interface)",
        "sageattn": "SageAttention2 (int8 QK, fp8/fp16 PV)",
        "sageattn_3": "SageAttention3 (FP4 microscaling)",
        "sage8_triton": "our Triton 8-bit attention (INT8 Q·K with per-token scales and smoothed K, FP8 e4m3 P·V; "
                        "on an H200: 0.72x FlashAttention-3's speed, rel-L2 0.039-0.042 vs float32)",
        "sage8_triton_bf16pv": "our Triton attention (INT8 Q·K with per-token scales and smoothed K, BF16 P·V; on an "
                               "H200: 0.66x FlashAttention-3's speed, rel-L2 0.017-0.032 vs float32)",
    }[kernel]
    return f"{text}, {where}"


def _split(load_options: LoadOptions, world: World, heads: int) -> tuple[int, int]:
    """(ulysses, ring) for the launcher's world, or OptionError."""
    ulysses, ring, size = load_options.ulysses, load_options.ring, world.size
    asked = " ".join(f"{n}={v}" for n, v in (("ulysses", ulysses), ("ring", ring)) if v is not None)
    blamed = {"option": "ulysses", "value": ulysses} if ulysses is not None else {"option": "ring", "value": ring}
    if size == 1:
        if (ulysses or 1) > 1 or (ring or 1) > 1:
            raise OptionError(f"{asked}: sequence parallel needs several processes started by a launcher, e.g. "
                              f"torchrun --nproc-per-node {(ulysses or 1) * (ring or 1)} -m infinite_talk.cli "
                              "generate ...; this is a single process", **blamed)
        return 1, 1
    if ulysses is None:
        ulysses = size // (ring or 1)
    if ring is None:
        ring = size // ulysses
    if ulysses * ring != size:
        raise OptionError(f"{asked}: ulysses × ring must equal the number of processes ({size}, from the launcher); "
                          f"{ulysses} × {ring} = {ulysses * ring}", **blamed)
    if heads % ulysses:
        raise OptionError(f"{asked or f'ulysses={ulysses}'}: the model's {heads} attention heads must divide by ulysses "
                          f"(Ulysses gives each process whole heads); use a divisor of {heads} and put the remaining "
                          "factor in --ring", option="ulysses", value=ulysses)
    return ulysses, ring


def _resolve_sequence_parallel(load_options: LoadOptions, world: World, caps: Capabilities, device: str,
                               precision: str, attn: Resolved, kernel: str) -> tuple[Resolved, Resolved, str, int, int]:
    """Returns (sequence_parallel, attention, kernel, ulysses, ring): ring attention needs a kernel that returns its
    log-sum-exp, so `auto`/`sdpa` may move to the fastest verified one that does."""
    from ..models.configs import GEOMETRIES
    from ..parallel.sequence import ring_capable

    requested = " ".join(f"{n}={v}" for n, v in (("ulysses", load_options.ulysses), ("ring", load_options.ring))
                         if v is not None) or "auto"
    heads = GEOMETRIES["tiny" if load_options.preset == "tiny" else "14b"].dit.num_heads
    ulysses, ring = _split(load_options, world, heads)
    if world.size == 1:
        return Resolved(requested, "off", "one process (start several with torchrun to split the work)"), attn, \
            kernel, 1, 1
    device_type = "cpu" if device == "cpu" else "cuda"
    if ring > 1 and not ring_capable(ATTENTION_BACKENDS[kernel][0], device_type):
        if load_options.attention not in ("auto", "sdpa"):
            raise OptionError(f"attention={load_options.attention}: ring attention (ring={ring}) merges partial "
                              "results by their log-sum-exp, which this kernel does not return; use attention auto or "
                              "sdpa, or ring 1 (Ulysses runs around every kernel)", option="attention",
                              value=load_options.attention)
        order = ["sdpa-efficient", "sdpa-math"] if precision == "fp32" else _attention_order(caps.gpu.capability)
        order = [k for k in order if ring_capable(ATTENTION_BACKENDS[k][0], device_type)]
        if load_options.attention == "sdpa":
            order = [k for k in order if k.startswith("sdpa-")]
        picked, skipped = _first_verified(order, caps, DTYPES[precision])
        if picked is None:
            raise _refuse("ring", str(ring), f"an attention kernel returning its log-sum-exp for {precision} "
                          "(cuDNN / flash SDPA, flash-attn, SageAttention2); use ulysses only (ring 1)",
                          f"{_have(caps, device)}" + "".join(f"; {s}" for s in skipped))
        attn = Resolved(attn.requested, "flash_attn_3" if picked == "fa3_fwd" else picked,
                        f"{_describe(picked)}; ring attention needs the log-sum-exp, which {kernel} does not return")
        kernel = picked
    backend = "nccl" if device_type == "cuda" else "gloo"
    where = "ring attention (diffusers) with" if ulysses == 1 else "diffusers Ulysses all-to-all" + (
        " and ring attention" if ring > 1 else "") + " around"
    effective = f"ulysses {ulysses} × ring {ring} over {world.size} processes ({backend})"
    reason = (f"{world.size} processes from the launcher (this is {world.label()}); {where} {kernel}; weights "
              "replicated on every process, encoders and VAE on rank 0")
    return Resolved(requested, effective, reason), attn, kernel, ulysses, ring


# ---- entry point -------------------------------------------------------------------------------------------------
def resolve(load_options: LoadOptions, caps: Capabilities, world: World | None = None) -> Plan:
    """Map every LoadOptions choice to what will run here, or raise `OptionError` naming the option and the reason.
    Call before loading any weights. `world`: the launcher's processes (default: from the environment)."""
    load_options.validate()
    world = world if world is not None else world_from_env()
    dev = _resolve_device(load_options.device, caps, world)
    device = dev.effective
    model = _resolve_precision("model_precision", load_options.model_precision, caps, device)
    vae = _resolve_precision("vae_precision", load_options.vae_precision, caps, device)
    quant = _resolve_quantization(load_options.quantization, caps, device, model.effective)
    t5_quant = _resolve_t5_quantization(load_options.t5_quantization, caps, device)
    compiled = _resolve_compile(load_options.compile, caps, device)
    attn, kernel = _resolve_attention(load_options.attention, caps, device, model.effective)
    sequence, attn, kernel, ulysses, ring = _resolve_sequence_parallel(load_options, world, caps, device,
                                                                       model.effective, attn, kernel)
    backend, provider = ATTENTION_BACKENDS[kernel]
    memory = plan_memory(load_options, caps, device=device, model_dtype=DTYPES[model.effective],
                         vae_dtype=DTYPES[vae.effective], quantization=quant.effective,
                         t5_quantization=t5_quant.effective, attention_backend=backend)
    return Plan(
        device=device,
        model_dtype=DTYPES[model.effective],
        vae_dtype=DTYPES[vae.effective],
        quantization=quant.effective,
        t5_quantization=t5_quant.effective,
        compile=compiled.effective == "on",
        attention_kernel=kernel,
        attention_backend=backend,
        attention_provider=provider,
        options={"device": dev, "model_precision": model, "vae_precision": vae, "quantization": quant,
                 "t5_quantization": t5_quant, "attention": attn, "compile": compiled, "offload": memory.offload,
                 "vae_tiling": memory.vae_tiling, "sequence_parallel": sequence},
        machine=caps.summary(),
        offload=memory.placement,
        vae_tiling=memory.vae_tiling.effective == "on",
        encoders_offloaded=memory.encoders_offloaded,
        memory=memory,
        world_size=world.size,
        ulysses=ulysses,
        ring=ring,
        dist_backend=("nccl" if device.startswith("cuda") else "gloo") if world.size > 1 else "",
    )
