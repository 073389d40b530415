"""The one options schema behind the CLI, the web UI and the job API.

`LoadOptions` says which model files to load and how (precision, quantization, attention). `GenerateOptions` says
what to make from which inputs. Each field carries its help text and allowed values in `metadata`, so every front end
builds its controls from here, and every front end reads what the user gave through `read`: it turns raw values
(command-line strings, widget values, JSON) into typed ones and validates them, refusing with an `OptionError` that
names the field. `validate()` checks types, choices, ranges and the rules between fields; whether a value can *run*
on this machine is the planner's job (`infinite_talk.plan`), which refuses with the reason instead of falling back
silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError

DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)
DEFAULT_PROMPT = "A person is talking."

PRECISIONS = ("fp32", "fp16", "bf16")
SCHEDULERS = ("euler", "unipc", "dpm++", "distill4")
AUDIO_MODES = ("para", "add")
SIZES = (480, 720)
MAX_BLOCKS = 40  # the 14B transformer; smaller geometries are checked against their own block count
OFFLOAD_FORMS = "auto, none, sequential or blocks:N (N transformer blocks kept in host memory, 1-40)"
LORA_STRENGTH_RANGE = (-10.0, 10.0)
_BLOCKS = re.compile(r"blocks:(\d+)")


# ---- the two values with a syntax of their own, parsed here (by validate() and the layers that use them) ----
def parse_offload(value: str, num_blocks: int = MAX_BLOCKS) -> tuple[str, int]:
    """`("auto"|"none"|"sequential", 0)` or `("blocks", N)`; `OptionError` for anything else."""
    if value in ("auto", "none", "sequential"):
        return value, 0
    m = _BLOCKS.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise OptionError(f"offload: unknown value {value!r}; choose {OFFLOAD_FORMS}", option="offload", value=value)
    n = int(m.group(1))
    if not 1 <= n <= num_blocks:
        raise OptionError(f"offload=blocks:{n}: the transformer has {num_blocks} blocks; choose blocks:1 to "
                          f"blocks:{num_blocks}", option="offload", value=value)
    return "blocks", n


@dataclass(frozen=True)
class LoraEntry:
    path: str
    strength: float = 1.0


def parse_lora_entries(entries: list[str] | tuple[str, ...] | None) -> list[LoraEntry]:
    """`PATH` or `PATH:STRENGTH` (a trailing `:number`; Windows drive colons are left alone) → entries."""
    if entries is None:
        return []
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        raise OptionError(f"lora: expected a list of 'PATH[:STRENGTH]' entries, got {entries!r}", option="lora",
                          value=entries)
    out = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise OptionError(f"lora: each entry is 'PATH' or 'PATH:STRENGTH', got {entry!r}", option="lora",
                              value=entry)
        path, strength = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head and not tail.startswith(("\\", "/")):
            try:
                strength = float(tail)
                path = head
            except ValueError:
                pass
        lo, hi = LORA_STRENGTH_RANGE
        if not math.isfinite(strength) or not lo <= strength <= hi:
            raise OptionError(f"lora: strength {tail} of {path} is outside [{lo:g}, {hi:g}]", option="lora",
                              value=entry)
        out.append(LoraEntry(path, strength))
    return out


def opt(default: Any, help: str, choices: tuple | None = None, **extra: Any):
    """A dataclass field with its help text and allowed values."""
    meta = {"help": help, "choices": choices, **extra}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoadOptions:
    """Which model files to load and how."""

    preset: str | None = opt(None, "'tiny' builds tiny random checkpoints in the real formats (tests, demos: noise video)",
                             choices=(None, "tiny"))
    models_dir: str | None = opt(None, "folder with the released model files (found by content, not by name)")
    transformer: str | None = opt(None, "Wan2.1-I2V-14B DiT: shard folder, single file or diffusers folder")
    adapter: str | None = opt(None, "InfiniteTalk adapter file (single/ or multi/infinitetalk.safetensors)")
    vae: str | None = opt(None, "Wan2.1 VAE file or folder")
    t5: str | None = opt(None, "umT5-XXL encoder weights")
    t5_tokenizer: str | None = opt(None, "folder of the google/umt5-xxl tokenizer")
    clip: str | None = opt(None, "CLIP ViT-H/14 vision weights")
    wav2vec: str | None = opt(None, "chinese-wav2vec2-base folder or single file")
    model_precision: str = opt("bf16", "compute precision of the transformer", choices=PRECISIONS)
    vae_precision: str = opt("bf16", "precision of the VAE", choices=PRECISIONS)
    quantization: str = opt("disabled", "quantization of the transformer weights",
                            choices=("disabled", "fp8", "int8", "nf4", "fp4"))
    t5_quantization: str = opt("disabled", "umT5 text encoder weights: 'fp8' stores them in fp8 e4m3 with per-row "
                               "scales (≈ half the memory of bf16)", choices=("disabled", "fp8"))
    attention: str = opt("auto", "attention kernel; 'sage8_triton' (INT8 Q·K, FP8 P·V) and 'sage8_triton_bf16pv' (INT8 "
                         "Q·K, BF16 P·V) are our Triton 8-bit kernels, run only when requested",
                         choices=("auto", "sdpa", "flash_attn_2", "flash_attn_3", "sageattn", "sageattn_3",
                                  "sage8_triton", "sage8_triton_bf16pv"))
    device: str = opt("auto", "'auto' (CUDA when present, else CPU), 'cpu' or 'cuda[:N]'")
    compile: bool = opt(False, "torch.compile each transformer block (CUDA + Triton): faster forwards after a "
                               "one-time compile (20 s to 3 min)")
    offload: str = opt("auto", "transformer weights in host memory: 'none', 'blocks:N' (N of the 40 blocks swapped in "
                       "per use, copied on a side stream while the previous block runs), 'sequential' (every layer "
                       "streamed: least GPU memory, slowest) or 'auto' (the fewest copies that fit the free GPU "
                       "memory, from the memory plan); encoders then leave the GPU after use",
                       pattern=r"auto|none|sequential|blocks:\d+")
    vae_tiling: str = opt("auto", "tiled VAE encode/decode: less GPU memory, seams possible; 'auto' tiles only when "
                          "the memory plan needs it", choices=("auto", "on", "off"))
    lora: list[str] = opt([], "LoRA file(s) for the transformer (lightx2v, FusioniX, PEFT, kohya...), each 'PATH' "
                          "or 'PATH:STRENGTH' (strength -10..10, default 1.0)")
    lora_mode: str = opt("merged", "'merged' adds LoRAs into the weights before quantization (no run-time cost); "
                         "'unmerged' applies them at run time (removable, also on quantized weights)",
                         choices=("merged", "unmerged"))
    mode: str = opt("standard", "'fast': a step-distilled LoRA (--lora) with 4 steps, 1 pass per step and fp8 where "
                    "this GPU runs fp8 matmuls; values you set yourself win (see presets/fast.py)",
                    choices=("standard", "fast"))
    ulysses: int | None = opt(None, "sequence parallel over the processes of a torchrun job (torchrun --nproc-per-node "
                              "N -m infinite_talk.cli generate ...): how many split the attention heads (Ulysses "
                              "all-to-all); default: the number of processes / ring", minimum=1, maximum=4096)
    ring: int | None = opt(None, "sequence parallel: how many pass key/value blocks around a ring (ring attention, "
                           "for long sequences); ulysses × ring = the number of processes; default: the number of "
                           "processes / ulysses (1 when ulysses is not given)", minimum=1, maximum=4096)

    def validate(self) -> LoadOptions:
        _check_fields(self)
        parse_offload(self.offload)
        if self.lora:
            parse_lora_entries(self.lora)
        if self.mode == "fast" and not self.lora:
            raise OptionError("mode=fast needs a step/CFG-distilled LoRA: pass --lora FILE (e.g. a lightx2v I2V "
                              "cfg-step-distill LoRA); with an already distilled transformer set --steps 4 "
                              "--text-scale 1 --audio-scale 1 yourself instead", option="mode", value=self.mode)
        return self


@dataclass
class GenerateOptions:
    """What to make: inputs, sampling and output."""

    image: str | None = opt(None, "reference image (image-to-video)")
    video: str | None = opt(None, "reference video (video dubbing)")
    audio: str | None = opt(None, "speech of speaker 1 (wav/mp3/flac/m4a/ogg or a video's audio)")
    audio2: str | None = opt(None, "speech of speaker 2 (optional)")
    audio_mode: str = opt("para", "two speakers: 'para' simultaneous, 'add' speaker 1 then speaker 2",
                          choices=AUDIO_MODES)
    bbox: list[list[int]] | None = opt(None, "per-speaker boxes [[row_min, col_min, row_max, col_max], ...] in "
                                       "source pixels (as text: 'r0 c0 r1 c1; r0 c0 r1 c1')")
    prompt: str = opt(DEFAULT_PROMPT, "what the video shows")
    negative_prompt: str = opt(DEFAULT_NEGATIVE_PROMPT, "null-text condition for guidance")
    size: int = opt(480, "resolution tier", choices=SIZES)
    steps: int = opt(40, "denoising steps per chunk (exactly these run)", minimum=1, maximum=1000)
    scheduler: str = opt("euler", "timestep schedule and solver", choices=SCHEDULERS)
    shift: float | None = opt(None, "timestep shift (default 7 at 480, 11 at 720)", minimum=0.0, maximum=100.0)
    text_scale: float = opt(5.0, "text guidance scale (1 drops the text pass)", minimum=0.0, maximum=50.0)
    audio_scale: float = opt(4.0, "audio guidance scale (1 with text 1: one pass per step)", minimum=0.0, maximum=50.0)
    use_apg: bool = opt(False, "adaptive projected guidance")
    seed: int | None = opt(None, "random seed (random when unset; the one used is recorded)", minimum=0,
                           maximum=2**63 - 1)
    color_correction: float | None = opt(None, "colour-correction strength against the first reference frame, 0-1 "
                                         "(default: 1 for an image, 0 for a video, whose scenes may change colour)",
                                         minimum=0.0, maximum=1.0)
    max_seconds: float | None = opt(None, "stop after this many seconds of video (default: the whole audio)",
                                    minimum=0.04, maximum=86400.0)
    frame_num: int = opt(81, "frames per chunk (4n+1)", minimum=5, maximum=321)
    motion_frames: int = opt(9, "context frames carried between chunks (4k+1)", minimum=1)
    step_cache: str = opt("off", "skip the transformer blocks on steps whose input barely changed: 'teacache' (the "
                          "reference's TeaCache, per-pass state) or 'firstblock' (diffusers FirstBlockCache)",
                          choices=("off", "teacache", "firstblock"))
    cache_threshold: float | None = opt(None, "step-cache threshold: higher skips more (default 0.2 for teacache, "
                                        "0.05 for firstblock)", minimum=0.0, maximum=1.0)
    out: str | None = opt(None, "output mp4 path (a JSON sidecar is written next to it)")

    @property
    def effective_color_correction(self) -> float:
        if self.color_correction is not None:
            return float(self.color_correction)
        return 0.0 if self.video else 1.0  # docs/REFERENCE.md D19: frame-0 matching fights scene changes in a video

    @property
    def effective_shift(self) -> float:
        if self.shift is not None:
            return float(self.shift)
        return 7.0 if self.size == 480 else 11.0

    def validate(self) -> GenerateOptions:
        _check_fields(self)
        if (self.frame_num - 1) % 4:
            raise OptionError(f"frame_num must be 4n+1 (e.g. 81), got {self.frame_num}", option="frame_num",
                              value=self.frame_num)
        if (self.motion_frames - 1) % 4 or self.motion_frames >= self.frame_num:
            raise OptionError(f"motion_frames must be 4k+1 and below frame_num, got {self.motion_frames}",
                              option="motion_frames", value=self.motion_frames)
        if self.cache_threshold is not None and self.step_cache == "off":
            raise OptionError("cache_threshold has no effect with step_cache off; choose --step-cache teacache or "
                              "firstblock, or drop the threshold", option="cache_threshold",
                              value=self.cache_threshold)
        return self


# ---- reading: raw values from any front end → typed, validated options ------------------------------------------
# Kinds of field, from the type hints: bool, int, float, str, lines (list[str]) and boxes (list[list[int]]).
_WHY = {"bool": "must be true or false", "int": "must be a whole number", "float": "is not a number",
        "str": "must be text", "lines": "must be a list of text entries (or text, one entry per line)"}
BOX_FORMS = ("[[row_min, col_min, row_max, col_max], ...] or the text 'r0 c0 r1 c1; r0 c0 r1 c1' (one box per "
             "speaker, whole source pixels)")


@functools.cache
def _kinds(cls) -> dict[str, tuple[str, bool]]:
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        optional = type(None) in args
        (base,) = [a for a in args if a is not type(None)]
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            out[name] = ("boxes" if typing.get_origin(item) is list else "lines", optional)
        else:
            out[name] = (base.__name__, optional)
    return out


def field_kind(cls, name: str) -> tuple[str, bool]:
    """`(kind, optional)` of a field: kind is bool, int, float, str, lines (a list of text) or boxes (speaker boxes);
    optional when None is a value (it means the default)."""
    return _kinds(cls)[name]


def _refusal(name: str, value: Any, why: str) -> OptionError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return OptionError(f"{name}: {shown} {why}", option=name, value=value)


def coerce(cls, name: str, raw: Any) -> Any:
    """The typed value of field `name` of `cls` from a raw value of any front end (command-line text, a widget's
    value, JSON), or None when nothing was given (None, or blank text for a non-text field or an optional one: the
    default applies). Wrong types are refused with an `OptionError` naming the field; choices and ranges are checked
    by `validate()`."""
    kind, optional = field_kind(cls, name)
    if raw is None or isinstance(raw, str) and not raw.strip() and (optional or kind != "str"):
        return None
    if kind == "boxes":
        return _boxes(name, raw)
    if kind == "lines":
        if isinstance(raw, str):
            return [line.strip() for line in raw.splitlines() if line.strip()]
        if isinstance(raw, list | tuple) and all(isinstance(entry, str) for entry in raw):
            return list(raw)
        raise _refusal(name, raw, _WHY[kind])
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise _refusal(name, raw, _WHY[kind])
    if kind == "str":
        if isinstance(raw, str | os.PathLike):  # a path given as a Path object (in-process callers)
            return os.fspath(raw)
        raise _refusal(name, raw, _WHY[kind])
    if kind == "int" and isinstance(raw, int) and not isinstance(raw, bool):
        return raw  # exact, however large (the range check follows)
    number = _number(name, raw, kind)
    if kind == "int":
        if not number.is_integer():
            raise _refusal(name, raw, _WHY[kind])
        return int(number)
    return number


def _number(name: str, raw: Any, kind: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise _refusal(name, raw, _WHY[kind])
    try:
        number = float(raw)
    except ValueError:
        raise _refusal(name, raw, _WHY[kind]) from None
    except OverflowError:  # an int beyond any float
        raise _refusal(name, raw, "is not a finite number") from None
    if not math.isfinite(number):
        raise _refusal(name, raw, "is not a finite number")
    return number


def _boxes(name: str, raw: Any) -> list[list[int]] | None:
    """Speaker boxes from text ('r0 c0 r1 c1; ...', commas and brackets allowed), from a list of boxes (JSON), or from
    the command line's `--bbox R0 C0 R1 C1 --bbox ...` (lists of text numbers)."""
    single = raw
    while isinstance(single, list | tuple) and len(single) == 1:
        single = single[0]  # one command-line value arrives as [[text]]
    if isinstance(single, str) and single.strip().startswith("[["):
        raw = single
    if isinstance(raw, str) and raw.strip().startswith("[["):  # a list of boxes as JSON text (the API's form)
        try:
            raw = json.loads(raw)
        except ValueError:
            pass  # read as text below: the refusal names the box that is not 4 whole numbers
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list | tuple) and all(isinstance(box, list | tuple | str) for box in raw):
        texts = []
        for box in raw:
            if isinstance(box, str):
                texts.append(box)
            elif all(isinstance(v, str) or isinstance(v, int | float) and not isinstance(v, bool) for v in box):
                texts.append(" ".join(str(v) for v in box))
            else:
                raise _refusal(name, raw, f"must be {BOX_FORMS}")
    else:
        raise _refusal(name, raw, f"must be {BOX_FORMS}")
    parts = [part.strip() for text in texts for part in re.split(r"[;\n]", text) if part.strip()]
    boxes = []
    for n, part in enumerate(parts):
        box = []
        for token in (t for t in re.split(r"[,\s]+", part.replace("[", " ").replace("]", " ")) if t):
            try:
                value = float(token)
            except ValueError:
                break
            if not value.is_integer():
                break
            box.append(int(value))
        else:
            if len(box) == 4:
                boxes.append(box)
                continue
        raise OptionError(f"{name}: box {n + 1} ({part!r}) must be 4 whole numbers row_min, col_min, row_max, "
                          "col_max; separate speakers with ';'", option=name, value=part)  # the box, as text
    return boxes or None


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str | os.PathLike)
    if kind == "lines":
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, list | tuple) and all(  # boxes
        isinstance(box, list | tuple) and len(box) == 4 and all(_type_ok("int", v) for v in box) for box in value)


def _check_fields(obj: Any) -> None:
    """Types first (a text where a number belongs is refused by name, not met as a TypeError later), then choices and
    ranges."""
    for name, (kind, optional) in _kinds(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional or _type_ok(kind, value):
            continue
        if isinstance(value, float) and kind == "float":
            raise _refusal(name, value, "is not a finite number")
        why = f"must be {BOX_FORMS}" if kind == "boxes" else _WHY[kind]
        raise _refusal(name, value, f"{why}, not {type(value).__name__}")
    _check_choices(obj)


def _check_choices(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise OptionError(f"{f.name}: unknown value {value!r}; choose one of: {shown}", option=f.name,
                              value=value)
        if value is None:
            continue
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        if lo is not None and value < lo or hi is not None and value > hi:
            raise OptionError(f"{f.name}: {value} is outside [{lo}, {hi if hi is not None else '∞'}]",
                              option=f.name, value=value)


def read_values(cls, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The typed values given in `raw` (field name → raw value from any front end), those not given left out;
    unknown names are errors, never ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise OptionError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}", option=unknown[0],
                          value=raw[unknown[0]])
    values = {name: coerce(cls, name, value) for name, value in raw.items()}
    return {name: value for name, value in values.items() if value is not None}


def read(cls, raw: Mapping[str, Any]):
    """Options of class `cls` from raw values (the CLI's flags, the UI's widgets, the API's JSON), coerced and
    validated: the one reader behind every front end. A field not given (None, blank) keeps its default."""
    return cls(**read_values(cls, raw)).validate()


from_dict = read  # a to_dict() dict (the follower's copy of the leader's options) reads back unchanged


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
