"""Step caches (TeaCache, FirstBlockCache): exactness at threshold 0, skip counts, per-pass state, reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infinite_talk.errors import OptionError
from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.transformer_loading import load_transformer_from_state_dict, state_dict_in_original_layout
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state
from infinite_talk.sampling.step_cache import TEACACHE_WARMUP_STEPS, StepCache, describe

G = GEOMETRY_TINY
EXAMPLES = Path(__file__).parent / "data" / "examples"
STEPS = 7
TIMESTEPS = torch.linspace(1000.0, 900.0, STEPS)


@pytest.fixture(scope="module")
def model():
    state = random_transformer_state(G, seed=11)
    return load_transformer_from_state_dict(state_dict_in_original_layout(state), G)


@pytest.fixture(scope="module")
def inputs():
    return random_transformer_inputs(G, seed=12)


def _run(model, inputs, passes, cache=None, context_name=None):
    """One chunk: every step calls every pass (cond: audio, drop_audio: silent audio), as the loop does."""
    outputs = {}
    if cache is not None:
        cache.start_chunk()
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            for name in passes:
                kwargs = dict(inputs, timestep=t.reshape(1))
                if name == "drop_audio":
                    kwargs["audio"] = torch.zeros_like(inputs["audio"])

                def call(kwargs=kwargs):
                    return model(**kwargs)

                outputs[name, i] = call() if cache is None else cache.call(context_name or name, i, STEPS, call)
    return outputs


@pytest.mark.parametrize("kind", ["teacache", "firstblock"])
def test_threshold_zero_is_identical_to_no_cache(model, inputs, kind):
    plain = _run(model, inputs, ["cond", "drop_audio"])
    cache = StepCache(model, kind, 0.0)
    cached = _run(model, inputs, ["cond", "drop_audio"], cache)
    cache.remove()
    assert cache.skipped_by_pass == {}
    for key, value in plain.items():
        assert torch.equal(cached[key], value), key


def test_teacache_skips_after_the_warmup_steps_of_each_pass(model, inputs):
    plain = _run(model, inputs, ["cond", "drop_audio"])
    cache = StepCache(model, "teacache", 1e9)  # every step after the warm-up is skipped
    cached = _run(model, inputs, ["cond", "drop_audio"], cache)
    skipped = STEPS - TEACACHE_WARMUP_STEPS
    assert dict(cache.skipped_by_pass) == {"cond": skipped, "drop_audio": skipped}
    assert cache.skipped_this_chunk == 2 * skipped
    for (name, i), value in plain.items():
        if i < TEACACHE_WARMUP_STEPS:
            assert torch.equal(cached[name, i], value)
        else:  # the cached residual stands in for the blocks: close, not equal
            assert not torch.equal(cached[name, i], value)
    # a new chunk starts fresh: the warm-up steps run again and the count restarts
    again = _run(model, inputs, ["cond", "drop_audio"], cache)
    cache.remove()
    assert cache.skipped_this_chunk == 2 * skipped
    assert all(torch.equal(again[k], cached[k]) for k in cached)


@pytest.mark.parametrize("kind,threshold", [("teacache", 1e9), ("firstblock", 1.0)])
def test_passes_keep_their_own_state(model, inputs, kind, threshold):
    """Interleaving passes must not change any pass's results (the reference's class-global counter does: #87)."""
    cache = StepCache(model, kind, threshold)
    both = _run(model, inputs, ["cond", "drop_audio"], cache)
    assert cache.skipped_this_chunk > 0
    for name in ("cond", "drop_audio"):
        alone = _run(model, inputs, [name], cache)
        for i in range(STEPS):
            assert torch.equal(both[name, i], alone[name, i]), (name, i)
    # control: one shared state for both passes (what a per-forward cache does) gives different results
    shared = _run(model, inputs, ["cond", "drop_audio"], cache, context_name="shared")
    cache.remove()
    assert any(not torch.equal(shared[k], both[k]) for k in both)


def test_remove_leaves_a_plain_transformer(model, inputs):
    plain = _run(model, inputs, ["cond"])
    for kind in ("teacache", "firstblock"):
        cache = StepCache(model, kind, 1e9)
        _run(model, inputs, ["cond"], cache)
        cache.remove()
        after = _run(model, inputs, ["cond"])  # no cache context needed any more
        assert all(torch.equal(after[k], plain[k]) for k in plain)
        assert model._cache_config is None


def test_plan_and_options():
    tea = describe("teacache", None, 720, 40)
    assert tea.threshold == 0.2 and "720p coefficients" in tea.detail and tea.may_skip
    short = describe("teacache", 0.3, 480, 4)
    assert not short.may_skip and "with 4 steps nothing can be skipped" in short.detail
    assert describe("firstblock", None, 480, 8).threshold == 0.05
    assert describe("off", None, 480, 8) is None
    with pytest.raises(OptionError, match="step_cache"):
        GenerateOptions(step_cache="magcache").validate()
    with pytest.raises(OptionError, match="cache_threshold has no effect"):
        GenerateOptions(cache_threshold=0.3).validate()
    with pytest.raises(OptionError, match="outside"):
        GenerateOptions(step_cache="teacache", cache_threshold=2.0).validate()


@pytest.fixture(scope="module")
def pipe():
    p = InfiniteTalkPipeline()
    p.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    return p


def _generate(pipe, tmp_path, name, **kw):
    frames, progress = [], []
    request = GenerateOptions(image=str(EXAMPLES / "portrait.png"), audio=str(EXAMPLES / "speech_en.wav"), steps=6,
                              text_scale=1.0, audio_scale=2.0, max_seconds=0.4, frame_num=9, motion_frames=5, seed=3,
                              out=str(tmp_path / name), **kw)
    result = pipe.generate(request, on_chunk=lambda k, f: frames.append(f), progress=progress.append)
    return result, frames, progress  # 10 frames in chunks of 9 (5 context frames): 2 chunks


def test_pipeline_threshold_zero_gives_the_same_video_and_skips_are_reported(pipe, tmp_path):
    off, off_frames, _ = _generate(pipe, tmp_path, "off.mp4")
    zero, zero_frames, _ = _generate(pipe, tmp_path, "zero.mp4", step_cache="teacache", cache_threshold=0.0)
    assert all((a == b).all() for a, b in zip(off_frames, zero_frames)) and len(off_frames) == len(zero_frames) == 2
    assert zero.sidecar["effective"]["cache_skips_per_chunk"] == [0, 0]
    assert off.sidecar["effective"]["step_cache"] is None

    fast, fast_frames, progress = _generate(pipe, tmp_path, "fbc.mp4", step_cache="firstblock", cache_threshold=1.0)
    eff = fast.sidecar["effective"]
    assert eff["step_cache"]["kind"] == "firstblock" and eff["step_cache"]["threshold"] == 1.0
    assert len(eff["cache_skips_per_chunk"]) == 2 and all(n > 0 for n in eff["cache_skips_per_chunk"])
    assert eff["cache_skips"] == sum(eff["cache_skips_per_chunk"]) <= eff["model_calls"]
    assert eff["model_calls_per_chunk"] == [12, 12]  # every call is still made; skipped ones skip the blocks
    assert max(p["cache_skips"] for p in progress) > 0
    assert any((a != b).any() for a, b in zip(off_frames, fast_frames))
    assert pipe.transformer._cache_config is None  # hooks removed after the run
