"""The memory plan: weight bytes exact against loaded models, activation traces equal to a real run's, the setting
`auto` picks is the cheapest that fits, explicit settings are kept (with a warning), and a CUDA out-of-memory error
in a chunk becomes a message that keeps the finished chunks and names a setting that fits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from infinite_talk.errors import OptionError
from infinite_talk.models.configs import GEOMETRY_14B, GEOMETRY_TINY
from infinite_talk.models.placement import Offload
from infinite_talk.models.quantize import quantize_transformer, weight_bytes
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.models.transformer_loading import load_transformer
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.plan import memory
from infinite_talk.plan.memory import GIB, MemoryModel, Setting, Shape, needed
from infinite_talk.plan.planner import resolve
from infinite_talk.testing.machines import simulated

EXAMPLES = __import__("pathlib").Path(__file__).parent / "data" / "examples"
SHAPE_480 = Shape(480, 832, 81, 1)


@pytest.fixture(scope="module")
def tiny_files(cache):
    from infinite_talk.presets.tiny import ensure_tiny_models

    return ensure_tiny_models()


def _gpu(free_gib: float, cc=(8, 9)):
    return simulated("h100", gpus=[{"name": "test GPU", "capability": cc, "total_memory_gib": free_gib + 0.6,
                                    "free_memory_gib": free_gib}])


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---- weights -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_bytes_equal_the_loaded_model(tiny_files, dtype):
    model = load_transformer(tiny_files.transformer, tiny_files.adapter, GEOMETRY_TINY, dtype=dtype)
    est = memory.transformer_bytes(GEOMETRY_TINY, str(dtype).removeprefix("torch."))
    assert est.total == _bytes(model)
    assert est.blocks == tuple(_bytes(b) for b in model.blocks)
    assert est.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mode", ["fp8-storage", "int8-weight-only", "nf4"])
def test_quantized_transformer_bytes_equal_torchaos_tensors(tiny_files, mode):
    model = load_transformer(tiny_files.transformer, tiny_files.adapter, GEOMETRY_TINY, dtype=torch.bfloat16)
    quantize_transformer(model, mode, "cpu")
    est = memory.transformer_bytes(GEOMETRY_TINY, "bfloat16", mode)
    assert est.total == weight_bytes(model)
    assert est.blocks == tuple(weight_bytes(b) for b in model.blocks)


def test_14b_sizes_match_the_released_model():
    bf16 = memory.transformer_bytes(GEOMETRY_14B, "bfloat16")
    assert bf16.params == 18_882_046_784  # docs/REFERENCE.md §1.9, tests/test_manifest_14b.py
    assert len(bf16.blocks) == 40 and abs(bf16.blocks[0] / 1e9 - 0.93) < 0.01  # docs/PERFORMANCE.md §6: 0.93 GB
    fp8 = memory.transformer_bytes(GEOMETRY_14B, "bfloat16", "fp8-storage")
    assert abs(fp8.blocks[0] / 1e9 - 0.465) < 0.01  # 0.46 GB per block in fp8
    assert 19.0 < fp8.total / 1e9 < 20.0  # ≈ 19.1 GB (+ the fp32-kept modules)
    assert memory.t5_params(GEOMETRY_14B)[0] + memory.t5_params(GEOMETRY_14B)[1] == pytest.approx(5.68e9, rel=0.01)
    assert memory.clip_params(GEOMETRY_14B) == pytest.approx(0.63e9, rel=0.01)


def test_encoder_bytes_equal_the_loaded_tiny_encoders(tiny_files):
    from infinite_talk.models.image_encoder import load_image_encoder
    from infinite_talk.models.text_encoder import load_text_encoder

    t5 = load_text_encoder(tiny_files.t5, tiny_files.t5_tokenizer, GEOMETRY_TINY, dtype=torch.bfloat16)
    clip = load_image_encoder(tiny_files.clip, GEOMETRY_TINY, dtype=torch.float16)
    assert memory.t5_bytes(GEOMETRY_TINY, 2) == sum(p.numel() * 2 for p in t5.model.parameters())
    assert memory.clip_params(GEOMETRY_TINY) == sum(p.numel() for p in clip.model.parameters())


# ---- activations -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("persons", [1, 2])
def test_meta_trace_equals_a_real_run(persons):
    """The estimator runs the model on the meta device; a CPU run of the same code allocates exactly the same."""
    shape = Shape(64, 112, 9, persons)
    estimate = memory.transformer_activation_bytes(GEOMETRY_TINY, "float32", "disabled", "native", shape)
    torch.manual_seed(0)
    model = InfiniteTalkTransformer.from_dit_config(dataclasses.replace(GEOMETRY_TINY.dit, num_layers=1)).eval()
    memory._set_backend_locally(model, "native")
    inputs = memory.transformer_inputs(GEOMETRY_TINY, shape, "cpu")
    peak, out = memory.trace_peak(model, **inputs)
    assert torch.isfinite(out).all()
    assert estimate == peak + sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)


def test_planning_leaves_the_process_attention_backend_alone():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry.get_active_backend()
    resolve(LoadOptions(), _gpu(23.0, (9, 0)))  # traces the model with a memory twin of the planned kernel
    assert _AttentionBackendRegistry.get_active_backend() == before


def test_14b_activations_at_480p():
    """3.48 GiB above the weights at 832x480: benchmarks/dit_forward.py measured a 38.7 GiB peak on an H200 for
    35.2 GiB of weights (docs/PERFORMANCE.md §6: ≈3.4 GiB for an implementation without the reference's ref map)."""
    act = memory.transformer_activation_bytes(GEOMETRY_14B, "bfloat16", "disabled", "_native_cudnn", SHAPE_480)
    assert 3.3 < act / GIB < 3.7
    assert memory.transformer_activation_bytes(GEOMETRY_14B, "bfloat16", "disabled", "_native_cudnn",
                                               Shape(720, 1280, 81, 1)) > 2 * act  # grows with the tokens


def test_vae_frames_are_extrapolated_like_a_full_trace():
    g = GEOMETRY_TINY
    assert memory._vae_extrapolated(g, "float32", 64, 112, 7) == pytest.approx(
        memory._vae_trace(g, "float32", 64, 112, 7), rel=0.01)


def test_tiled_vae_estimate_is_close_and_not_below_a_full_trace():
    g, shape = GEOMETRY_TINY, Shape(320, 320, 9, 1)  # 4 tiles of 256 px at stride 192
    vae = memory._vae_wrapper(g, "float32")
    vae.enable_tiling()
    try:
        decode, _ = memory.trace_peak(vae.decode, torch.empty(1, 16, 3, 40, 40, device="meta"))
        video = torch.empty(1, 3, 9, 320, 320, device="meta")
        encode, _ = memory.trace_peak(vae.encode, video)
    finally:
        vae.disable_tiling()
    real = max(encode + 2 * video.numel() * 4, decode)
    est = memory.vae_activation_bytes(g, "float32", shape, True)
    assert real <= est <= 1.3 * real
    assert est < memory.vae_activation_bytes(g, "float32", shape, False)


# ---- choosing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("free_gib, quantization", [(23.0, "disabled"), (15.0, "disabled"), (12.0, "disabled")])
def test_auto_takes_the_fewest_copies_that_fit(free_gib, quantization):
    model = MemoryModel(GEOMETRY_14B, quantization=quantization, attention_backend="_native_cudnn")
    free = free_gib * GIB
    est, fits = model.choose(free, SHAPE_480)
    assert fits and needed(est.peak) <= free
    placement = Offload.parse(est.setting.offload, 40)
    kind, n = placement.kind, placement.blocks
    assert kind == "blocks"
    fewer = model.estimate(dataclasses.replace(est.setting, offload=f"blocks:{n - 1}" if n > 1 else "none"),
                           SHAPE_480)
    assert not fewer.fits(free) and not model.estimate(dataclasses.replace(est.setting, vae_tiling=True),
                                                       SHAPE_480).peak < est.peak * 0.9
    # every further swapped block lowers the forward's peak by one block
    more = model.estimate(dataclasses.replace(est.setting, offload=f"blocks:{min(n + 2, 40)}"), SHAPE_480)
    assert more.phases["transformer"] < est.phases["transformer"]


@pytest.mark.parametrize("quantization", ["fp8-storage", "int8-weight-only", "nf4"])
def test_quantized_transformers_swap_blocks_but_are_never_streamed_leaf_by_leaf(quantization):
    """Quantized blocks swap in compact form (our hook); diffusers' leaf-level offloading cannot move torchao
    tensors (H200, torchao 0.18): auto never picks `sequential` for them and an explicit request is refused."""
    model = MemoryModel(GEOMETRY_14B, quantization=quantization, attention_backend="_native_cudnn")
    offloads = {s.offload for s in model.candidates()}
    assert "sequential" not in offloads and {"none", "blocks:1", "blocks:40"} <= offloads
    flag = {"fp8-storage": "fp8", "int8-weight-only": "int8", "nf4": "nf4"}[quantization]
    plan = resolve(LoadOptions(quantization=flag, offload="blocks:8"), _gpu(23.0))
    assert plan.offload == Offload("blocks", 8, "compact")  # quantized blocks travel in compact form
    with pytest.raises(OptionError, match=r"^offload=sequential: leaf-level offloading of quantized layers does not "
                                          r"work.*; use --offload blocks:40 \(every block swapped in its compact"):
        resolve(LoadOptions(quantization=flag, offload="sequential"), _gpu(23.0))


def test_compiled_quantized_blocks_are_never_swapped():
    """torch.compile fails on swapped-in torchao weights (H200, benchmarks/results/offload_check_compile_h200.json):
    auto keeps a compiled quantized model whole, an explicit swap is refused, bf16 + compile still swaps."""
    compiled = MemoryModel(GEOMETRY_14B, quantization="int8-weight-only", attention_backend="_native_cudnn",
                           compiled=True)
    assert {s.offload for s in compiled.candidates()} == {"none"}
    with pytest.raises(OptionError, match=r"^offload=blocks:8: compiled blocks with swapped quantized weights fail "
                                          r"in torch.compile .*; drop --compile, or use --offload none"):
        resolve(LoadOptions(quantization="int8", offload="blocks:8", compile=True), _gpu(23.0))
    assert resolve(LoadOptions(offload="blocks:8", compile=True), _gpu(23.0)).offload == Offload("blocks", 8, "diffusers")
    plan = resolve(LoadOptions(quantization="int8", compile=True), _gpu(11.25))
    assert plan.offload.kind == "none"  # does not fit, and says so, rather than swap compiled quantized blocks
    assert plan.options["offload"].reason.startswith("nothing fits the free 11.2 GiB")
    assert [w for w in plan.memory.warnings if "without --compile the int8-weight-only blocks could be swapped "
                                                    "to fit" in w]


def test_a_quantized_transformer_is_swapped_when_it_does_not_fit_whole():
    """int8 at 480p: ~15 GiB of block weights; with 12 GiB free auto swaps blocks instead of refusing."""
    model = MemoryModel(GEOMETRY_14B, quantization="int8-weight-only", attention_backend="_native_cudnn")
    whole = model.estimate(Setting("none", False, True), SHAPE_480)
    est, fits = model.choose(11.25 * GIB, SHAPE_480)
    assert whole.peak > 11.25 * GIB and fits and est.setting.offload.startswith("blocks:")
    n = int(est.setting.offload.split(":")[1])
    smaller = model.estimate(dataclasses.replace(est.setting, offload=f"blocks:{n - 1}"), SHAPE_480)
    assert not smaller.fits(11.25 * GIB)  # the fewest swapped blocks that fit


def test_a_quantized_t5_is_never_streamed():
    """Streaming T5 uses the same group offloading that cannot move torchao tensors: an fp8 T5 stays resident."""
    model = MemoryModel(GEOMETRY_14B, attention_backend="_native_cudnn", t5_quantization="fp8")
    assert {s.encoders_offloaded for s in model.candidates()} == {False}
    plan = resolve(LoadOptions(t5_quantization="fp8", offload="blocks:20"), _gpu(23.0))
    assert plan.offload == Offload("blocks", 20, "diffusers") and not plan.encoders_offloaded


def test_plan_lines_show_the_resolved_setting_and_the_copies():
    plan = resolve(LoadOptions(), _gpu(23.0))
    line = next(x for x in plan.lines() if x.startswith("offload: "))
    assert line.startswith("offload: auto → blocks:") and "> free 23.0 GiB with every weight on the GPU" in line
    assert str(plan.offload) == plan.options["offload"].effective and plan.encoders_offloaded
    n = plan.offload.blocks
    block_gb = memory.transformer_bytes(GEOMETRY_14B, "bfloat16").blocks[0] / 1e9
    copies = next(x for x in plan.memory.notes if x.startswith(f"{plan.offload} copies"))
    assert f"({n * block_gb:.1f} GB)" in copies and f"{n * block_gb / 25:.2f} s at 25 GB/s" in copies
    assert needed(plan.memory.estimate.to_dict()["peak_gib"] * GIB) <= 23.01 * GIB
    assert json.loads(json.dumps(plan.to_dict()))["memory"]["offload"]["effective"] == str(plan.offload) == plan.to_dict()["offload"]


def test_everything_stays_on_a_big_gpu():
    plan = resolve(LoadOptions(), _gpu(78.6, (9, 0)))
    assert (plan.offload, plan.vae_tiling, plan.encoders_offloaded) == (Offload("none"), False, False)
    assert plan.options["vae_tiling"].effective == "off"


def test_explicit_settings_are_kept_and_warned_about():
    plan = resolve(LoadOptions(offload="blocks:2", vae_tiling="off"), _gpu(12.0))
    assert str(plan.offload) == "blocks:2" and plan.options["offload"].reason.startswith("requested; est. peak")
    assert not plan.vae_tiling
    (warning,) = plan.memory.warnings
    assert "this may run out of GPU memory" in warning and "would fit" in warning
    plan = resolve(LoadOptions(offload="none", vae_tiling="on"), _gpu(78.6))
    assert plan.offload == Offload("none") and plan.vae_tiling and not plan.encoders_offloaded


def test_host_memory_shortage_is_a_warning():
    caps = dataclasses.replace(_gpu(23.0), host_ram_available_gib=16.0)
    plan = resolve(LoadOptions(), caps)
    assert any("of host memory while loading" in w for w in plan.memory.warnings)


def test_suggestions_fit_the_request():
    model = MemoryModel(GEOMETRY_14B, attention_backend="_native_cudnn")
    context = model.context(36.0 * GIB, Setting(), (8, 9))
    fits = memory.fit_suggestions(context, SHAPE_480)
    best, _ = model.choose(36.0 * GIB, SHAPE_480)
    assert fits[0] == best.setting.flags() and fits[0].startswith("--offload blocks:")
    quantized = [f for f in fits if f.startswith("--quantization")]
    assert {f.split()[1] for f in quantized} == {"fp8", "int8"}
    assert not any("sequential" in f for f in quantized)  # quantized layers are never streamed leaf by leaf


# ---- out of memory in a chunk --------------------------------------------------------------------------------------
def test_out_of_memory_in_a_chunk_keeps_the_finished_frames_and_names_a_setting(cache, tmp_path, monkeypatch):
    from infinite_talk.media.mp4 import probe_media
    from infinite_talk.pipeline import InfiniteTalkPipeline

    pipe = InfiniteTalkPipeline()
    plan = pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32",
                                        vae_tiling="on"))
    assert pipe.vae.model.use_tiling and "vae_tiling: on → on (requested" in "\n".join(plan.lines)
    # the plan of a 14B model on a 24 GiB GPU with everything on it (which does not fit): the message must offer
    # what the plan offers for this request's frame size
    from infinite_talk.media.frames import FrameSource, bucket_for

    first = FrameSource(str(EXAMPLES / "portrait.png")).first_frame()
    h, w = pipe.geometry.frame_size(bucket_for(first.size[1], first.size[0], 480))
    context = MemoryModel(GEOMETRY_14B, attention_backend="_native_cudnn").context(24 * GIB, Setting(), (8, 9))
    monkeypatch.setattr(pipe.load_plan.memory, "context", context)
    fits = memory.fit_suggestions(context, Shape(h, w, 33, 1))
    assert fits
    calls = {"n": 0}
    forward = pipe.transformer.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # one model call per chunk below: the second chunk fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", failing_forward)
    out = tmp_path / "oom.mp4"
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(EXAMPLES / "speech_en.wav"), steps=1,
                              text_scale=1.0, audio_scale=1.0, max_seconds=2.0, frame_num=33, seed=3, out=str(out))
    with pytest.raises(memory.OutOfGpuMemoryError) as err:
        pipe.generate(request)
    message = str(err.value)
    assert message == (f"out of GPU memory at chunk 2/2 ({w}x{h}, 33 frames per chunk); the finished 33 frames are "
                       f"in {out}; this would fit: " + " or ".join(fits))
    assert probe_media(out).frames == 33
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["status"] == "failed" and sidecar["error"] == message
    assert sidecar["effective"]["offload"] == "none" and sidecar["effective"]["vae_tiling"] == "on"
    assert sidecar["output"]["chunks_done"] == 1


# ---- against GPU measurements recorded by the benchmarks -----------------------------------------------------------
RESULTS = __import__("pathlib").Path(__file__).parent.parent / "benchmarks" / "results"


def _recorded_runs():
    """(label, estimate kwargs, measured GiB) of every eager 480p/720p run recorded in benchmarks/results."""
    runs = []
    for path in sorted(RESULTS.glob("dit_*.json")):
        d = json.loads(path.read_text())
        if d.get("config") != "14b" or d.get("compile") or not d.get("peak_memory_gib") or d.get("dtype") != "bf16":
            continue  # compiled kernels fuse the transients the estimate traces
        shape = Shape(*((480, 832) if d["size"] == 480 else (720, 1280)), 81, d.get("speakers", 1))
        runs.append((path.name, d.get("quantization", "disabled"), d["attention"], shape, Setting("none", False, True),
                     "transformer_alone", d["peak_memory_gib"]))
    for path in sorted(RESULTS.glob("memory_*.json")):
        d = json.loads(path.read_text())
        shape = Shape(**d["shape"])
        for mode in d["modes"]:
            for run in mode.get("runs", []):
                for phase, gib in (run.get("measured_gib") or {}).items():
                    runs.append((f"{path.name} {mode['mode']} {run['setting']['offload']} {phase}",
                                 mode["quantization"], d["attention"], shape, Setting(**run["setting"]), phase, gib))
    return runs


def test_gpu_measurements_are_recorded():
    """The 15% check below runs on the measurements committed in benchmarks/results; none would make it vacuous."""
    assert len(_recorded_runs()) >= 10


@pytest.mark.parametrize("label, quantization, attention, shape, setting, phase, measured", _recorded_runs())
def test_estimates_are_within_15_percent_of_recorded_gpu_peaks(label, quantization, attention, shape, setting, phase,
                                                               measured):
    model = MemoryModel(GEOMETRY_14B, quantization=quantization, attention_backend=attention)
    if phase == "transformer_alone":  # benchmarks/dit_forward.py: the transformer and its inputs only
        estimate = model.transformer.total + memory.transformer_activation_bytes(
            GEOMETRY_14B, "bfloat16", quantization, attention, shape)
    else:
        estimate = model.estimate(setting, shape).phases[phase]
    assert abs(estimate / GIB / measured - 1) <= 0.15, (label, estimate / GIB, measured)
