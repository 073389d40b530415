"""What this machine can run: hardware, versions and a functional micro-test per kernel (docs/OPTIONS.md §4.1).

`probe()` runs once per process and is cached. Every kernel/library entry is a `Kernel(available, reason, version)`:
`available` is True only when the package imports, the hardware gate passes AND a tiny call matches a float32
reference; `reason` says what ran, or why not ("package X not installed", "needs sm >= 8.9; this GPU is sm_80",
"micro-test failed: <error>"). `Capabilities.from_dict()` builds the same object from plain data, so tests can
stand in for machines we do not have (`infinite_talk.testing.machines.simulated(name)`).

Micro-tests (all on the current CUDA device — cuda:0, or cuda:LOCAL_RANK in a torchrun job — when a GPU is present,
else on the CPU):
- attention: q, k, v of shape [B=1, H=2, L=128, D=128] in bf16 (head dim 128 as in Wan) against float32 math SDPA,
  relative L2 error below 1e-2 for bf16 kernels, 5e-2 for SageAttention2 (int8/fp8), 0.25 for SageAttention3 (fp4);
  L = 128 rather than 64 because SageAttention3 works on 128-token blocks. Our Triton 8-bit kernels (sage8_triton,
  sage8_triton_bf16pv) are also run on L = 200 queries / 130 keys (partial blocks) and must stay within the format's
  own error: 5e-2 with FP8 P·V, 3e-2 with BF16 P·V (the issue's accuracy gate; benchmarks/attention_fp8.py measures it
  at the 480p shape).
- `torch._scaled_mm`: fp8 e4m3 32x32 tiles, tensorwise scales, against the float32 product of the same fp8 values.
- torchao (int8, fp8 weight-only, fp8 dynamic, NF4, NVFP4): a 128x128 bf16 Linear quantized in place, against its
  unquantized output.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

# Display order and meaning of the kernel/library entries.
KERNELS: dict[str, str] = {
    "sdpa_math": "torch SDPA, math backend",
    "sdpa_efficient": "torch SDPA, memory-efficient backend (bf16 and fp32)",
    "sdpa_flash": "torch SDPA, flash backend (FA2 kernels in torch; CPU flash kernel on CPU)",
    "sdpa_cudnn": "torch SDPA, cuDNN backend",
    "flash_attn_2": "FlashAttention-2 (flash-attn >= 2.6.3, diffusers 'flash')",
    "flash_attn_3": "FlashAttention-3 (flash_attn_interface, dist flash_attn_3, diffusers '_flash_3')",
    "fa3_fwd": "FlashAttention-3 forward-only wheel fa3-fwd (fa3_fwd_interface)",
    "sageattn": "SageAttention2 (sageattention >= 2.1.1, diffusers 'sage')",
    "sageattn_3": "SageAttention3 FP4 (sageattn3, Blackwell)",
    "sage8_triton": "our Triton attention: INT8 Q·K (per-token scales, smoothed K), FP8 e4m3 P·V",
    "sage8_triton_bf16pv": "our Triton attention: INT8 Q·K (per-token scales, smoothed K), BF16 P·V",
    "scaled_mm_fp8": "torch._scaled_mm fp8 e4m3 GEMM",
    "torchao_fp8_wo": "torchao float8 weight-only (fp8 e4m3 storage, per-row scales, upcast GEMM)",
    "torchao_int8_wo": "torchao int8 weight-only",
    "torchao_fp8_dynamic": "torchao float8 dynamic activation + weight (rowwise)",
    "torchao_nvfp4": "torchao NVFP4 dynamic activation + weight",
    "torchao_nf4": "torchao NF4 4-bit weights (NormalFloat, block 64)",
    "cpu_bf16": "bf16 matmul on the CPU",
    "cpu_fp16": "fp16 matmul on the CPU",
    "triton": "Triton (torch.compile, Triton kernels); import only",
    "gguf": "gguf reader (GGUF checkpoints); import only",
}

BLACKWELL_SMS = ((10, 0), (12, 0), (12, 1))
_ATTN_SHAPE = (1, 2, 128, 128)  # B, H, L, D
_REQUIRED_FLASH_ATTN = (2, 6, 3)  # diffusers 0.42 `_REQUIRED_FLASH_VERSION`
_REQUIRED_SAGE = (2, 1, 1)  # diffusers 0.42 `_REQUIRED_SAGE_VERSION`


@dataclass(frozen=True)
class Kernel:
    """One kernel or library: does it run here, why (not), and which version."""

    available: bool
    reason: str
    version: str | None = None
    dtypes: tuple[str, ...] | None = None  # compute dtypes the micro-test passed for (None: not dtype-specific)

    def runs(self, dtype: str) -> bool:
        """Available for this torch dtype name ("bfloat16", ...)."""
        return self.available and (self.dtypes is None or dtype in self.dtypes)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total_memory_gib: float
    free_memory_gib: float | None = None

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class Capabilities:
    """Probe result. `device` is "cuda" when a usable CUDA GPU is present, else "cpu". Kernel tests ran on
    `gpus[probed_gpu]` (the current CUDA device) when there is a GPU."""

    device: str
    gpus: tuple[GpuInfo, ...] = ()
    probed_gpu: int = 0
    host_ram_gib: float | None = None
    host_ram_available_gib: float | None = None
    cpu_native_bf16: bool = False
    python_version: str = ""
    torch_version: str = ""
    cuda_version: str | None = None
    cudnn_version: str | None = None
    driver_version: str | None = None
    kernels: dict[str, Kernel] = field(default_factory=dict)
    simulated: str | None = None  # name of the simulated machine, None for a real probe

    # ---- convenience -------------------------------------------------------------------------------------------
    @property
    def gpu(self) -> GpuInfo | None:
        return self.gpus[self.probed_gpu] if self.gpus else None

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    @property
    def gpu_name(self) -> str | None:
        return self.gpu.name if self.gpu else None

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        return self.gpu.capability if self.gpu else None

    def kernel(self, key: str) -> Kernel:
        """The entry for `key`; an entry missing from a (simulated) probe counts as unavailable."""
        if key not in KERNELS:
            raise KeyError(f"unknown kernel {key!r}")
        return self.kernels.get(key) or Kernel(False, "not probed")

    def summary(self) -> str:
        """One line: 'NVIDIA H100 80GB HBM3 (sm_90), CUDA 13.0' or 'no CUDA GPU (CPU only)'."""
        if not self.gpu:
            return "no CUDA GPU (CPU only)"
        cuda = f", CUDA {self.cuda_version}" if self.cuda_version else ""
        return f"{self.gpu.name} ({self.gpu.sm}){cuda}"

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpus"] = [{**dataclasses.asdict(g), "capability": list(g.capability)} for g in self.gpus]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        """Build from plain data (JSON, a test fixture). Unknown keys are errors; kernels may be given as
        `Kernel`, a dict, or a bare bool (then the reason says 'simulated')."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown Capabilities field(s): {', '.join(unknown)}")
        data = dict(data)
        gpus = []
        for i, g in enumerate(data.pop("gpus", ()) or ()):
            if isinstance(g, GpuInfo):
                gpus.append(g)
                continue
            g = dict(g)
            g.setdefault("index", i)
            g["capability"] = tuple(g["capability"])
            gpus.append(GpuInfo(**g))
        kernels = {}
        for key, k in (data.pop("kernels", None) or {}).items():
            if key not in KERNELS:
                raise ValueError(f"unknown kernel {key!r}; known: {', '.join(KERNELS)}")
            if isinstance(k, bool):
                k = Kernel(k, "simulated: available" if k else "simulated: not available")
            elif isinstance(k, dict):
                k = Kernel(**{**k, "dtypes": tuple(k["dtypes"]) if k.get("dtypes") else None})
            kernels[key] = k
        data.setdefault("device", "cuda" if gpus else "cpu")
        return cls(gpus=tuple(gpus), kernels=kernels, **data)


# ---- the real probe ----------------------------------------------------------------------------------------------
_CACHE: Capabilities | None = None


def probe(refresh: bool = False) -> Capabilities:
    """Probe this machine once per process (cached; `refresh=True` probes again)."""
    global _CACHE
    if _CACHE is None or refresh:
        _CACHE = _probe()
    return _CACHE


def _probe() -> Capabilities:
    import torch

    gpus: list[GpuInfo] = []
    cuda_ok = False
    try:
        cuda_ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver must not crash the probe
        cuda_ok = False
    current = 0
    if cuda_ok:
        current = torch.cuda.current_device()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free = None
            try:  # only this process' GPU: asking another would open a CUDA context on it (every rank of a job)
                free = torch.cuda.mem_get_info(i)[0] / 2**30 if i == current else None
            except Exception:
                pass
            gpus.append(GpuInfo(i, p.name, (p.major, p.minor), round(p.total_memory / 2**30, 1),
                                None if free is None else round(free, 1)))
    cudnn = None
    try:
        if cuda_ok and torch.backends.cudnn.is_available():
            v = torch.backends.cudnn.version()
            cudnn = f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v and v >= 10000 else str(v)
    except Exception:
        pass
    total, avail = _host_ram_gib()
    caps = Capabilities(
        device="cuda" if gpus else "cpu",
        gpus=tuple(gpus),
        host_ram_gib=total,
        host_ram_available_gib=avail,
        cpu_native_bf16=_cpu_native_bf16(),
        python_version=platform.python_version(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cudnn_version=cudnn,
        driver_version=_driver_version() if gpus else None,
        probed_gpu=current,
    )
    kernels = {key: _run_check(key, caps) for key in KERNELS}
    return dataclasses.replace(caps, kernels=kernels)


def _host_ram_gib() -> tuple[float | None, float | None]:
    total = avail = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return (None if total is None else round(total, 1)), (None if avail is None else round(avail, 1))


def _cpu_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- checks --------------------------------------------------------------------------------------------------
class _Unmet(Exception):
    """A requirement is not met (hardware, package, version): not a micro-test failure."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def _run_check(key: str, caps: Capabilities) -> Kernel:
    fn = _CHECKS[key]
    version = None
    try:
        version, what, *dtypes = fn(caps)
        return Kernel(True, what, version, tuple(dtypes[0]) if dtypes else None)
    except _Unmet as err:
        reason, version = err.args[0], (err.args[1] if len(err.args) > 1 else None)
        return Kernel(False, reason, version)
    except Exception as err:  # the micro-test itself broke: that is the reason
        return Kernel(False, f"micro-test failed: {_one_line(err)}", version)


def _dist_version(*dists: str) -> str | None:
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _vtuple(v: str | None) -> tuple[int, ...]:
    parts = []
    for p in (v or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _import(module: str, package: str, version: str | None):
    if importlib.util.find_spec(module) is None:
        raise _Unmet(f"package {package} not installed", version)
    try:
        if module == "torchao":  # torchao prints about CUDA-only .so files it cannot load; keep the table clean
            from ..models.quantize import import_torchao

            return import_torchao()
        return importlib.import_module(module)
    except Exception as err:
        raise _Unmet(f"package {package} does not import: {_one_line(err)}", version) from err


def _need_gpu(caps: Capabilities, what: str = "a CUDA GPU", min_sm: tuple[int, int] | None = None,
              sms: tuple[tuple[int, int], ...] | None = None, version: str | None = None) -> None:
    if not caps.gpu:
        raise _Unmet(f"needs {what}; this machine has none", version)
    cc = caps.gpu.capability
    if min_sm and cc < min_sm:
        raise _Unmet(f"needs sm >= {min_sm[0]}.{min_sm[1]}; this GPU is {caps.gpu.sm} ({caps.gpu.name})", version)
    if sms and cc not in sms:
        wanted = "/".join(f"sm_{a}{b}" for a, b in sms)
        raise _Unmet(f"needs {what} ({wanted}); this GPU is {caps.gpu.sm} ({caps.gpu.name})", version)


def _dev(caps: Capabilities) -> str:
    return f"cuda:{caps.probed_gpu}" if caps.gpu else "cpu"


def _qkv(device: str, dtype=None):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(_ATTN_SHAPE, generator=g) for _ in range(3))
    return [t.to(device=device, dtype=dtype or torch.bfloat16) for t in (q, k, v)]


def _ref_attention(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def _compare(out, ref, tol: float, label: str) -> str:
    import torch

    out = out[0] if isinstance(out, tuple | list) else out
    if tuple(out.shape) != tuple(ref.shape):
        raise RuntimeError(f"{label}: output shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
    out = out.float()
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{label}: non-finite output")
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if err > tol:
        raise RuntimeError(f"{label}: relative error {err:.3g} > {tol:g} against the float32 reference")
    return f"rel err {err:.2g}"


def _per_dtype(dev: str, dtypes: tuple[str, ...], run, tol: float, label: str):
    """Run an attention micro-test for each compute dtype; (what, passed dtypes), or raise if none passed."""
    import torch

    results, passed, first_error = [], [], None
    for dt in dtypes:
        q, k, v = _qkv(dev, getattr(torch, dt))
        try:
            results.append(f"{dt} {_compare(run(q, k, v), _ref_attention(q, k, v), tol, label)}")
            passed.append(dt)
        except Exception as err:  # a dtype the kernel does not take is a result, not a crash
            first_error = first_error or err
            results.append(f"{dt} failed: {_one_line(err)}")
    if not passed:
        raise first_error
    return f"micro-test passed on {dev} ([1,2,128,128]; {'; '.join(results)})", tuple(passed)


def _blhd(fn):
    """Call a [B, L, H, D] kernel on [B, H, L, D] test tensors."""
    def run(q, k, v):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    return run


def _sdpa_check(backend_name: str, cuda_only: bool, dtypes=("bfloat16", "float16")):
    def check(caps: Capabilities):
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        version = torch.__version__
        if cuda_only:
            _need_gpu(caps, version=version)
        backend = getattr(SDPBackend, backend_name)

        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        # on CPU only bf16 is checked: fp16 SDPA there is slow and the CPU plan never picks a kernel by dtype
        dev = _dev(caps)
        return (version, *_per_dtype(dev, dtypes if dev != "cpu" else ("bfloat16",), run, 1e-2, backend_name))

    return check


def _check_flash_attn_2(caps: Capabilities):
    version = _dist_version("flash-attn", "flash_attn")
    _need_gpu(caps, "a CUDA GPU with sm >= 8.0", min_sm=(8, 0), version=version)
    mod = _import("flash_attn", "flash-attn", version)
    if _vtuple(version) < _REQUIRED_FLASH_ATTN:
        raise _Unmet(f"flash-attn {version} installed; diffusers needs >= 2.6.3", version)
    return (version, *_per_dtype(_dev(caps), ("bfloat16", "float16"), _blhd(mod.flash_attn_func), 1e-2, "flash_attn"))


def _fa3_check(module: str, package: str, dists: tuple[str, ...], diffusers_dist: str | None):
    def check(caps: Capabilities):
        version = _dist_version(*dists)
        _need_gpu(caps, "a Hopper GPU", sms=((9, 0),), version=version)
        mod = _import(module, package, version)
        if diffusers_dist and _dist_version(diffusers_dist) is None:
            raise _Unmet(f"{module} imports but the {diffusers_dist} distribution is not installed, so diffusers' "
                         "_flash_3 backend refuses it", version)
        # the fa3-fwd wheel is built without fp16 ("This flash attention build does not support FP16", H200)
        return (version, *_per_dtype(_dev(caps), ("bfloat16", "float16"), _blhd(mod.flash_attn_func), 1e-2, module))

    return check


def _check_sageattn(caps: Capabilities):
    version = _dist_version("sageattention")
    _need_gpu(caps, "a CUDA GPU with sm >= 8.0", min_sm=(8, 0), version=version)
    mod = _import("sageattention", "sageattention", version)
    if _vtuple(version) < _REQUIRED_SAGE:
        raise _Unmet(f"sageattention {version} installed; needs >= 2.1.1 (SageAttention2, built from source)",
                     version)

    def run(q, k, v):
        return mod.sageattn(q, k, v, tensor_layout="HND", is_causal=False)

    return (version, *_per_dtype(_dev(caps), ("bfloat16", "float16"), run, 5e-2, "sageattn"))


def _check_sageattn_3(caps: Capabilities):
    version = _dist_version("sageattn3", "sageattention3", "sageattention3_blackwell")
    _need_gpu(caps, "a Blackwell GPU", sms=BLACKWELL_SMS, version=version)
    if _vtuple(caps.cuda_version) < (12, 8):
        raise _Unmet(f"needs CUDA >= 12.8; torch is built with CUDA {caps.cuda_version}", version)
    mod = _import("sageattn3", "sageattn3", version)

    def run(q, k, v):
        return mod.sageattn3_blackwell(q, k, v, per_block_mean=False)

    return (version, *_per_dtype(_dev(caps), ("bfloat16", "float16"), run, 0.25, "sageattn3"))


def _sage8_check(pv: str, tol: float, gate: dict[str, Any]):
    def check(caps: Capabilities):
        import torch

        from ..models.int8_attention import int8_attention

        version = _dist_version("triton")
        _need_gpu(caps, version=version, **gate)
        _import("triton", "triton", version)
        dev = _dev(caps)
        what, dtypes = _per_dtype(dev, ("bfloat16", "float16"), _blhd(lambda q, k, v: int8_attention(q, k, v, pv)),
                                  tol, f"int8_attention pv={pv}")
        g = torch.Generator(device="cpu").manual_seed(1)
        q, k, v = (torch.randn(1, n, 2, 128, generator=g).to(dev, torch.bfloat16) for n in (200, 130, 130))
        k = k + 2.0  # an offset shared by all keys: what the smoothing removes
        ref = _ref_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        ragged = _compare(int8_attention(q, k, v, pv), ref, tol, f"int8_attention pv={pv} (200x130)")
        return version, f"{what}; 200 queries x 130 keys: {ragged}", dtypes

    return check


def _check_scaled_mm(caps: Capabilities):
    import torch

    version = torch.__version__
    _need_gpu(caps, "a CUDA GPU with sm >= 8.9", min_sm=(8, 9), version=version)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(32, 32, generator=g).to(_dev(caps), torch.float8_e4m3fn)
    b = torch.randn(32, 32, generator=g).to(_dev(caps), torch.float8_e4m3fn).t()  # column-major second operand
    one = torch.tensor(1.0, device=_dev(caps))
    out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    ref = a.float() @ b.float()
    return version, f"micro-test passed on {_dev(caps)} (e4m3 32x32 tensorwise, {_compare(out, ref, 1e-2, '_scaled_mm')})"


def _tiny_linear(dev: str):
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False)).to(dev, torch.bfloat16)
    x = torch.randn(16, 128, device=dev, dtype=torch.bfloat16)
    return lin, x, lin(x).float().detach()


def _torchao_check(config: str, tol: float, gpu: dict[str, Any] | None):
    def check(caps: Capabilities):
        version = _dist_version("torchao")
        if gpu is not None:
            _need_gpu(caps, version=version, **gpu)
        _import("torchao", "torchao", version)
        if _vtuple(version) < (0, 15):
            raise _Unmet(f"torchao {version} installed; diffusers 0.42 needs >= 0.15", version)
        if config == "nvfp4":
            from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig as cfg
        elif config == "NF4WeightOnlyConfig":
            from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig as cfg
        else:
            q = importlib.import_module("torchao.quantization")
            cfg = getattr(q, config)
        from torchao.quantization import quantize_

        dev = _dev(caps)
        lin, x, ref = _tiny_linear(dev)
        if config == "Float8DynamicActivationFloat8WeightConfig":
            from torchao.quantization import PerRow

            quantize_(lin, cfg(granularity=PerRow()))
        else:
            quantize_(lin, cfg())
        out = lin(x)
        return version, f"micro-test passed on {dev} (128x128 Linear, {_compare(out, ref, tol, config)})"

    return check


def _cpu_matmul_check(dtype_name: str):
    def check(caps: Capabilities):
        import torch

        dt = getattr(torch, dtype_name)
        g = torch.Generator(device="cpu").manual_seed(0)
        a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
        out = a.to(dt) @ b.to(dt)
        native = "; native bf16 instructions" if dtype_name == "bfloat16" and caps.cpu_native_bf16 else ""
        return torch.__version__, f"micro-test passed on cpu ({_compare(out, a @ b, 2e-2, dtype_name)}{native})"

    return check


def _import_only(module: str, package: str):
    def check(caps: Capabilities):
        version = _dist_version(package)
        _import(module, package, version)
        return version, "imports (not micro-tested)"

    return check


_CHECKS = {
    "sdpa_math": _sdpa_check("MATH", cuda_only=False, dtypes=("bfloat16", "float16", "float32")),
    "sdpa_efficient": _sdpa_check("EFFICIENT_ATTENTION", cuda_only=True, dtypes=("bfloat16", "float16", "float32")),
    "sdpa_flash": _sdpa_check("FLASH_ATTENTION", cuda_only=False),
    "sdpa_cudnn": _sdpa_check("CUDNN_ATTENTION", cuda_only=True),
    "flash_attn_2": _check_flash_attn_2,
    "flash_attn_3": _fa3_check("flash_attn_interface", "flash_attn_3", ("flash_attn_3", "flash-attn-3"), "flash_attn_3"),
    "fa3_fwd": _fa3_check("fa3_fwd_interface", "fa3-fwd", ("fa3-fwd", "fa3_fwd"), None),
    "sageattn": _check_sageattn,
    "sageattn_3": _check_sageattn_3,
    "sage8_triton": _sage8_check("fp8", 5e-2, {"what": "a CUDA GPU with sm >= 8.9 (fp8 tensor cores)",
                                               "min_sm": (8, 9)}),
    "sage8_triton_bf16pv": _sage8_check("bf16", 3e-2, {"what": "a CUDA GPU with sm >= 8.0", "min_sm": (8, 0)}),
    "scaled_mm_fp8": _check_scaled_mm,
    "torchao_fp8_wo": _torchao_check("Float8WeightOnlyConfig", 0.08, None),
    "torchao_int8_wo": _torchao_check("Int8WeightOnlyConfig", 2e-2, None),
    "torchao_fp8_dynamic": _torchao_check("Float8DynamicActivationFloat8WeightConfig", 0.1,
                                          {"what": "a CUDA GPU with sm >= 8.9", "min_sm": (8, 9)}),
    "torchao_nvfp4": _torchao_check("nvfp4", 0.3, {"what": "a Blackwell GPU", "sms": BLACKWELL_SMS}),
    "torchao_nf4": _torchao_check("NF4WeightOnlyConfig", 0.15, None),
    "cpu_bf16": _cpu_matmul_check("bfloat16"),
    "cpu_fp16": _cpu_matmul_check("float16"),
    "triton": _import_only("triton", "triton"),
    "gguf": _import_only("gguf", "gguf"),
}
assert set(_CHECKS) == set(KERNELS)


def hardware_gate(caps: Capabilities, what: str = "a CUDA GPU", min_sm: tuple[int, int] | None = None,
                  sms: tuple[tuple[int, int], ...] | None = None) -> str | None:
    """Why `caps` fails a GPU-only check's hardware gate (the reason a real probe gives), or None when it passes."""
    try:
        _need_gpu(caps, what, min_sm, sms)
    except _Unmet as err:
        return err.args[0]
    return None
