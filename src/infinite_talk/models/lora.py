"""LoRA files of the InfiniteTalk transformer (docs/FORMATS.md §9): read, check by keys and shapes, merge or attach.

Accepted conventions, recognised per key (never by file name):

* Kohya / lightx2v / FusioniX: `<path>.lora_down.weight` [r, in], `<path>.lora_up.weight` [out, r], `<path>.alpha`;
* PEFT / diffusers: `<path>.lora_A[.<adapter>].weight`, `<path>.lora_B[.<adapter>].weight` (`lora_B.bias` = a bias Δ);
* full deltas: `<path>.diff` (weight Δ: norms, modulation, …), `<path>.diff_b` (bias Δ), `<path>.diff_m` (Δ of the
  `<path>.modulation` table);
* prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.`, `pipe.dit.`, `model.`,
  and the underscore spellings `lora_unet__blocks_0_self_attn_q` / `lycoris_blocks_0_…`;
* module paths in the released Wan names (`blocks.0.self_attn.q`) or in this model's diffusers names
  (`blocks.0.attn1.to_q`).

Every key is resolved by exact lookup in a table built from the model itself (its parameter names and the released
names of `transformer_loading`), so underscores inside names (`self_attn`, `k_img`) need no guessing.

Maths (docs/REFERENCE.md D3; the reference gets it wrong): `W ← W + s·(alpha/r)·(B @ A)`, r = rank = A.shape[0], alpha = r
when the file has none; `bias ← bias + s·diff_b`; `W ← W + s·diff`. s is the user's strength (default 1.0).

Modes:
* `merged`: added into the weights in place, in float32, then cast back — before any quantization; no runtime cost.
* `unmerged`: Linear layers get a forward hook adding `s·(alpha/r)·(x Aᵀ) Bᵀ` (and `x·diffᵀ`, `diff_b`) at run
  time, on top of whatever the base layer is (also quantized); the strength can be changed and the LoRA removed
  without reloading. Deltas on non-Linear tensors (norm weights, modulation tables, the patch-embedding conv) are
  small; they are patched in place and restored by `remove()`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, OptionError
from ..options import LoraEntry, parse_lora_entries
from .checkpoint_io import load_state_dict, tensor_infos
from .transformer_loading import model_to_original_key

MODES = ("merged", "unmerged")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.",
             "model.", "lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<pair>lora_down|lora_up|lora_A|lora_B)(?:\.(?!weight$|bias$)[^.]+)?\.(?P<leaf>weight|bias)"
    r"|(?P<single>alpha|diff_b|diff_m|diff))$"
)
_ROLE = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}
# model width -> the model a mismatching LoRA was probably made for (docs/FORMATS.md §1)
_KNOWN_DIMS = {1536: "Wan 1.3B", 3072: "Wan2.2 5B", 4096: "LongCat", 5120: "Wan 14B"}


# ---- key resolution ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where a LoRA path lands: a module (`module`, with weight/bias) or a bare parameter (`param`)."""

    name: str  # this model's module path, or parameter name for bare parameters
    is_param: bool = False

    def weight_name(self) -> str:
        return self.name if self.is_param else f"{self.name}.weight"


def target_table(model: nn.Module) -> dict[str, Target]:
    """Every spelling a LoRA file may use for each weight of `model` → its Target."""
    table: dict[str, Target] = {}
    for name, _ in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and module_path:
            target = Target(module_path)
            spellings = {module_path}
            try:
                spellings.add(model_to_original_key(name).rpartition(".")[0])
            except KeyError:
                pass
        else:  # bare parameter: `scale_shift_table` (released: `modulation`)
            target = Target(name, is_param=True)
            spellings = {name}
            try:
                spellings.add(model_to_original_key(name))
            except KeyError:
                pass
        for s in list(spellings):
            spellings.add(s.replace(".", "_"))
        for s in spellings:
            table.setdefault(s, target)
    return table


def _resolve(path: str, table: dict[str, Target]) -> Target | None:
    if path in table:
        return table[path]
    for prefix in _PREFIXES:
        if path.startswith(prefix) and path[len(prefix):] in table:
            return table[path[len(prefix):]]
    return None


# ---- reading and validating ----------------------------------------------------------------------------------------
@dataclass
class LoraPatch:
    """All tensors of one file for one target."""

    target: Target
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha/rank (1 when the file gives no alpha)."""
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.rank


@dataclass
class LoraFile:
    path: Path
    patches: list[LoraPatch]
    total_keys: int
    unmatched: list[str]  # file keys that match nothing in this model

    @property
    def applied_keys(self) -> int:
        return sum(len(p.keys) for p in self.patches)

    def alpha_rank(self) -> str:
        pairs = sorted({(p.alpha if p.alpha is not None else p.rank, p.rank) for p in self.patches
                        if p.rank is not None})
        if not pairs:
            return "none (full deltas only)"
        shown = ", ".join(f"{a:g}/{r}" for a, r in pairs[:3])
        return shown + (f", … ({len(pairs)} combinations)" if len(pairs) > 3 else "")


def _refuse_shape(path: Path, key: str, got, expected, what: str) -> CheckpointError:
    hint = ""
    for size in (*got,):
        if size in _KNOWN_DIMS and size not in expected:
            hint = f" — it looks made for {_KNOWN_DIMS[size]}"
            break
    return CheckpointError(f"{path}: LoRA tensor {key} has shape {list(got)} but this model's {what} is "
                           f"{list(expected)}; this LoRA was made for a different model{hint}")


def read_lora(path: str | Path, model: nn.Module) -> LoraFile:
    """Read one LoRA file and match it against `model` (by keys, then shapes). Raises `CheckpointError` naming the
    file when it is not a LoRA, was made for another model, or matches no weight of this one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found")
    infos = tensor_infos(path)  # header first: no tensor read for a file that is not a LoRA
    parsed = {k: _KEY.match(k) for k in infos}
    lora_keys = [k for k, m in parsed.items() if m]
    if not lora_keys:
        shown = ", ".join(list(infos)[:3])
        raise CheckpointError(
            f"{path}: not a LoRA file — none of its {len(infos)} tensors is a lora_down/lora_up, lora_A/lora_B, "
            f"alpha, diff or diff_b tensor (first keys: {shown}); LoHa/LoKr files are not supported"
        )
    state = load_state_dict(path)
    table = target_table(model)
    params = dict(model.named_parameters())
    patches: dict[Target, LoraPatch] = {}
    unmatched = [k for k in infos if not parsed[k]]
    for key in lora_keys:
        m = parsed[key]
        role = _ROLE.get(m["pair"]) if m["pair"] else m["single"]
        module_path = m["path"]
        if role == "up" and m["leaf"] == "bias":  # PEFT lora_bias: a plain bias delta
            role = "diff_b"
        elif m["leaf"] == "bias":
            unmatched.append(key)
            continue
        if role == "diff_m":
            module_path, role = module_path + ".modulation", "diff"
        target = _resolve(module_path, table)
        if target is None:
            unmatched.append(key)
            continue
        patch = patches.setdefault(target, LoraPatch(target))
        tensor = state[key]
        if role == "alpha":
            patch.alpha = float(tensor.float().reshape(-1)[0])
        elif getattr(patch, role) is not None:
            raise CheckpointError(f"{path}: two tensors give the {role} of {target.name} (one is {key})")
        else:
            setattr(patch, role, tensor)
        patch.keys.append(key)

    usable = []
    for patch in patches.values():
        weight_name = patch.target.weight_name()
        weight = params.get(weight_name)
        if (patch.down is None) != (patch.up is None):
            have = "lora_down/lora_A" if patch.down is not None else "lora_up/lora_B"
            raise CheckpointError(f"{path}: {patch.keys[0]}: the LoRA pair of {patch.target.name} has only its "
                                  f"{have} tensor; the file is incomplete")
        if patch.down is not None:
            if weight is None or weight.ndim < 2:
                unmatched += patch.keys
                continue
            a, b = patch.down.flatten(1), patch.up.flatten(1)
            out_features, in_features = weight.shape[0], weight[0].numel()
            if a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{path}: {patch.keys[0]}: lora_down has rank {a.shape[0]} but lora_up has "
                                      f"rank {b.shape[1]}; the file is corrupt")
            if a.shape[1] != in_features:
                raise _refuse_shape(path, patch.keys[0], patch.down.shape, tuple(weight.shape), weight_name)
            if b.shape[0] != out_features:
                raise _refuse_shape(path, patch.keys[0], patch.up.shape, tuple(weight.shape), weight_name)
        if patch.diff is not None:
            if weight is None:
                unmatched += patch.keys
                continue
            if tuple(patch.diff.shape) != tuple(weight.shape):
                if patch.diff.numel() != weight.numel():
                    raise _refuse_shape(path, patch.keys[0], patch.diff.shape, tuple(weight.shape), weight_name)
                patch.diff = patch.diff.reshape(weight.shape)
        if patch.diff_b is not None:
            bias = None if patch.target.is_param else params.get(f"{patch.target.name}.bias")
            if bias is None:  # e.g. a bias delta for an RMSNorm, which has no bias
                unmatched += [k for k in patch.keys if k.endswith(("diff_b", ".bias"))]
                patch.keys = [k for k in patch.keys if not k.endswith(("diff_b", ".bias"))]
                patch.diff_b = None
            elif tuple(patch.diff_b.reshape(-1).shape) != tuple(bias.shape):
                raise _refuse_shape(path, patch.keys[0], patch.diff_b.shape, tuple(bias.shape),
                                    f"{patch.target.name}.bias")
        if patch.down is None and patch.diff is None and patch.diff_b is None:
            unmatched += patch.keys  # an alpha alone
            continue
        usable.append(patch)

    if not usable:
        shown = ", ".join(lora_keys[:3])
        raise CheckpointError(
            f"{path}: LoRA matched 0 modules of this model ({len(lora_keys)} LoRA tensors, e.g. {shown}); it was "
            "made for a different model — InfiniteTalk needs LoRAs for Wan2.1-I2V-14B (or T2V-14B)"
        )
    return LoraFile(path, usable, len(infos), sorted(unmatched))


# ---- applying ----------------------------------------------------------------------------------------------------
def _delta(patch: LoraPatch, strength: float, weight_shape, device) -> torch.Tensor | None:
    """The float32 weight Δ of one patch: s·(alpha/r)·B@A + s·diff (None if the patch changes no weight)."""
    delta = None
    if patch.down is not None:
        a = patch.down.flatten(1).to(device, torch.float32)
        b = patch.up.flatten(1).to(device, torch.float32)
        delta = (strength * patch.scale) * (b @ a).reshape(weight_shape)
    if patch.diff is not None:
        d = strength * patch.diff.to(device, torch.float32)
        delta = d if delta is None else delta + d
    return delta


def _param(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoraFile, strength: float) -> None:
    """Add the LoRA into the weights, in float32, cast back to each weight's dtype (before quantization)."""
    for patch in lora.patches:
        weight = _param(model, patch.target.weight_name())
        _check_plain(weight, lora.path)
        delta = _delta(patch, strength, weight.shape, weight.device)
        if delta is not None:
            weight.copy_((weight.float() + delta).to(weight.dtype))
        if patch.diff_b is not None:
            bias = _param(model, f"{patch.target.name}.bias")
            bias.copy_((bias.float() + strength * patch.diff_b.reshape(-1).to(bias.device, torch.float32))
                       .to(bias.dtype))


def _check_plain(tensor: torch.Tensor, path: Path) -> None:
    if type(tensor) not in (torch.Tensor, nn.Parameter) or not tensor.is_floating_point() or tensor.element_size() < 2:
        raise OptionError(f"{path}: cannot merge a LoRA into quantized weights ({type(tensor).__name__}); merge "
                          "before quantization or use lora_mode unmerged", option="lora_mode", value="merged")


class _LinearLora:
    """The run-time part of one LoRA on one Linear: output += s·(alpha/r)·(x Aᵀ) Bᵀ + s·x·diffᵀ + s·diff_b."""

    def __init__(self, patch: LoraPatch, strength: float, dtype: torch.dtype, device):
        self.scale = patch.scale
        self.strength = strength
        self.dtype = dtype
        cast = {"device": device, "dtype": dtype}
        self.down = None if patch.down is None else patch.down.flatten(1).to(**cast)
        self.up = None if patch.up is None else patch.up.flatten(1).to(**cast)
        self.diff = None if patch.diff is None else patch.diff.to(**cast)
        self.diff_b = None if patch.diff_b is None else patch.diff_b.reshape(-1).to(**cast)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        out = torch.zeros((), dtype=self.dtype, device=x.device)
        if self.down is not None:
            out = F.linear(F.linear(x, self.down), self.up) * (self.strength * self.scale)
        if self.diff is not None:
            out = out + F.linear(x, self.diff) * self.strength
        if self.diff_b is not None:
            out = out + self.diff_b * self.strength
        return out


class LoraHandle:
    """Unmerged LoRAs on a model: change strengths, check they are still attached, remove them (restores weights)."""

    def __init__(self):
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._linear: list[tuple[int, nn.Module, _LinearLora]] = []  # (file index, module, runtime)
        self._by_module: dict[int, list[_LinearLora]] = {}
        self._patched: list[tuple[int, nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (index, param, orig, Δ/s)
        self._strengths: list[float] = []

    @property
    def runtime_layers(self) -> int:
        return len(self._by_module)

    @property
    def patched_tensors(self) -> int:
        return len({id(p) for _, p, _, _ in self._patched})

    def _add_linear(self, index: int, module: nn.Module, runtime: _LinearLora) -> None:
        self._linear.append((index, module, runtime))
        if id(module) in self._by_module:
            self._by_module[id(module)].append(runtime)
            return
        runtimes = self._by_module[id(module)] = [runtime]

        def hook(_mod, args, output):
            for r in runtimes:
                if r.strength != 0:
                    output = output + r(args[0]).to(output.dtype)
            return output

        self._hooks.append(module.register_forward_hook(hook))

    @torch.no_grad()
    def set_strength(self, index: int, strength: float) -> None:
        """Strength of the `index`-th LoRA (0 disables it), without reloading."""
        self._strengths[index] = strength
        for i, _, runtime in self._linear:
            if i == index:
                runtime.strength = strength
        self._repatch()

    @torch.no_grad()
    def _repatch(self) -> None:
        """Patched tensors = original + Σ strength·unit Δ, recomputed from the kept originals."""
        restored: set[int] = set()
        for _, param, original, _ in self._patched:
            if id(param) not in restored:
                param.copy_(original)
                restored.add(id(param))
        for i, param, _, unit_delta in self._patched:
            param.copy_((param.float() + self._strengths[i] * unit_delta.to(param.device)).to(param.dtype))

    def verify(self, model: nn.Module) -> None:
        """Raise if a hooked layer was replaced (e.g. by a quantizer that swaps modules): the LoRA would be lost."""
        present = {id(m) for m in model.modules()}
        lost = {id(m) for _, m, _ in self._linear if id(m) not in present}
        if lost:
            raise RuntimeError(f"{len(lost)} LoRA layers are no longer part of the model (replaced after the LoRA "
                               "was attached); attach LoRAs after module replacement")

    @torch.no_grad()
    def remove(self) -> None:
        """Detach every LoRA: hooks removed, patched tensors restored to their originals."""
        for h in self._hooks:
            h.remove()
        restored: set[int] = set()
        for _, param, original, _ in self._patched:
            if id(param) not in restored:
                param.copy_(original)
                restored.add(id(param))
        self._hooks, self._linear, self._by_module, self._patched = [], [], {}, []


@torch.no_grad()
def attach_lora(model: nn.Module, lora: LoraFile, strength: float, handle: LoraHandle,
                device: torch.device | str | None = None) -> None:
    """Unmerged: hooks on Linear layers (LoRA tensors on `device`, in each layer's float dtype); other tensors are
    patched in place with their originals kept for `remove()`."""
    index = len(handle._strengths)
    handle._strengths.append(strength)
    for patch in lora.patches:
        module = None if patch.target.is_param else model.get_submodule(patch.target.name)
        if isinstance(module, nn.Linear):
            weight = module.weight
            dtype = weight.dtype if weight.is_floating_point() and weight.element_size() >= 2 else torch.bfloat16
            runtime = _LinearLora(patch, strength, dtype, device if device is not None else weight.device)
            handle._add_linear(index, module, runtime)
            continue
        weight = _param(model, patch.target.weight_name())
        _check_plain(weight, lora.path)
        unit = _delta(patch, 1.0, weight.shape, weight.device)
        if unit is not None:
            handle._patched.append((index, weight, weight.detach().clone(), unit))
        if patch.diff_b is not None:
            bias = _param(model, f"{patch.target.name}.bias")
            handle._patched.append((index, bias, bias.detach().clone(), patch.diff_b.reshape(-1).float()))
    handle._repatch()


# ---- entry point -------------------------------------------------------------------------------------------------
@dataclass
class LoraReport:
    path: str
    strength: float
    mode: str
    applied_keys: int
    total_keys: int
    modules: int
    alpha_rank: str
    unmatched: list[str]

    def line(self) -> str:
        text = (f"lora: {self.path} → {self.applied_keys} of {self.total_keys} keys {self.mode} "
                f"({self.modules} modules), strength {self.strength:g}, alpha/rank {self.alpha_rank}")
        if self.unmatched:
            text += f"; {len(self.unmatched)} keys match no module of this model (e.g. {self.unmatched[0]})"
        return text


@dataclass
class LoraResult:
    reports: list[LoraReport] = field(default_factory=list)
    handle: LoraHandle | None = None  # unmerged only

    @property
    def lines(self) -> list[str]:
        return [r.line() for r in self.reports]

    def as_dict(self) -> list[dict]:
        return [{k: v for k, v in vars(r).items() if k != "unmatched"} | {"unmatched": r.unmatched[:20]}
                for r in self.reports]


def apply_loras(model: nn.Module, entries: list[str] | list[LoraEntry] | None, mode: str = "merged",
                device: torch.device | str | None = None,
                progress: Callable[[str], None] | None = None) -> LoraResult:
    """Read, validate and apply every LoRA entry (`PATH[:STRENGTH]`) to `model`; the one call the pipeline makes
    right after loading the transformer (before quantization). Every file is validated before any is applied."""
    if mode not in MODES:
        raise OptionError(f"lora_mode: unknown value {mode!r}; choose one of: {', '.join(MODES)}",
                          option="lora_mode", value=mode)
    entries = list(entries or [])
    parsed = entries if all(isinstance(e, LoraEntry) for e in entries) else parse_lora_entries(entries)
    if not parsed:
        return LoraResult()
    say = progress or (lambda msg: None)
    files = []
    for entry in parsed:
        say(f"reading LoRA {entry.path}")
        files.append(read_lora(entry.path, model))
    result = LoraResult(handle=LoraHandle() if mode == "unmerged" else None)
    for entry, lora in zip(parsed, files):
        if mode == "merged":
            merge_lora(model, lora, entry.strength)
        else:
            attach_lora(model, lora, entry.strength, result.handle, device)
        result.reports.append(LoraReport(str(entry.path), entry.strength, mode, lora.applied_keys, lora.total_keys,
                                         len(lora.patches), lora.alpha_rank(), lora.unmatched))
    model.lora_result = result
    return result
