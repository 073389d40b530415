"""Schedules, samplers and guidance (docs/REFERENCE.md §3.4–3.5, docs/OPTIONS.md §2.4)."""

import pytest
import torch

from infinite_talk.errors import OptionError
from infinite_talk.sampling.guidance import APGState, combine, passes_for
from infinite_talk.sampling.schedules import SCHEDULER_NAMES, make_sampler, reference_timesteps


def test_reference_timesteps_match_documented_sigmas():
    # docs/REFERENCE.md §3.4: 8 steps, shift 2 → σ 1.0, 0.9232, 0.8335, 0.7276, 0.6006, 0.4453, 0.2513, 0.0020, 0
    sig = (reference_timesteps(8, 2.0) / 1000).tolist()
    assert sig == pytest.approx([1.0, 0.9232, 0.8335, 0.7276, 0.6006, 0.4453, 0.2513, 0.0020, 0.0], abs=1e-4)
    ts = reference_timesteps(40, 7.0)
    assert ts.dtype == torch.float32 and ts.shape == (41,)
    assert (ts[:3] / 1000).tolist() == pytest.approx([1.0, 0.9963, 0.9923], abs=1e-4)
    assert (ts[-4:] / 1000).tolist() == pytest.approx([0.2784, 0.1607, 0.0070, 0.0], abs=1e-4)  # …, 0.2784, 0.1607, 0.0070, 0


def _run(sampler, latent, velocity):
    calls = []
    x = latent
    for i, t in enumerate(sampler.timesteps):
        calls.append(float(t))
        x = sampler.step(velocity(x, t), i, x)
    return x, calls


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_model_calls_equal_reported_steps(name, steps):
    sampler = make_sampler(name, steps, 5.0)
    plan = sampler.describe()
    expected = 4 if name == "distill4" else steps
    _, calls = _run(sampler, torch.zeros(2, 3), lambda x, t: torch.ones_like(x))
    assert len(calls) == plan.steps == expected
    assert plan.fixed == (name == "distill4")
    assert plan.requested_steps == steps
    assert len(plan.sigmas) == expected + 1 and plan.sigmas[-1] == 0.0
    assert plan.sigmas[0] == pytest.approx(1.0, abs=1e-3)  # every sampler starts from (almost) pure noise
    assert all(a > b for a, b in zip(plan.sigmas, plan.sigmas[1:]))
    assert calls == pytest.approx([s * 1000 for s in plan.sigmas[:-1]], rel=1e-5)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_exact_velocity_recovers_clean_sample(name):
    # x_σ = (1−σ)·x0 + σ·ε and v = ε − x0: every flow solver must land on x0 when the model is exact.
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    sampler = make_sampler(name, 6, 3.0)
    s0 = float(sampler.sigmas[0])  # 1.0, or 0.99986 for the diffusers DPM flow sigmas
    out, _ = _run(sampler, (1 - s0) * x0 + s0 * eps, lambda x, t: eps - x0)
    assert torch.allclose(out, x0, atol=1e-4)


def test_euler_update_is_reference_step():
    s = make_sampler("euler", 8, 2.0)
    ts = reference_timesteps(8, 2.0)
    latent, pred = torch.full((3,), 2.0), torch.full((3,), 0.5)
    out = s.step(pred, 6, latent)
    assert torch.equal(out, latent - pred * ((ts[6] - ts[7]) / 1000))


def test_distill4_list_is_warped_fixed_list():
    s = make_sampler("distill4", 40, 5.0)
    assert (s.timesteps / 1000).tolist() == pytest.approx([1.0, 0.9375, 0.833333, 0.625], abs=1e-6)
    assert s.describe().steps == 4 and s.describe().requested_steps == 40


def test_multistep_samplers_reset_per_chunk():
    s = make_sampler("unipc", 4, 7.0)
    a, _ = _run(s, torch.ones(16, 2, 4, 4), lambda x, t: x * 0.3)
    with pytest.raises(IndexError):
        s.step(torch.ones(16, 2, 4, 4), 4, torch.ones(16, 2, 4, 4))
    s.reset()
    b, _ = _run(s, torch.ones(16, 2, 4, 4), lambda x, t: x * 0.3)
    assert torch.equal(a, b)


def test_sampler_option_errors():
    with pytest.raises(OptionError, match="option 'scheduler': unknown value 'ddim'; choose one of euler, unipc"):
        make_sampler("ddim", 10, 5.0)
    with pytest.raises(OptionError, match="option 'steps' must be a whole number of at least 1, got 0"):
        make_sampler("euler", 0, 5.0)
    with pytest.raises(OptionError, match="option 'shift' must be a number above 0"):
        reference_timesteps(10, 0)


# ----------------------------------------------------------------------------------------------------- guidance

@pytest.mark.parametrize(
    "text, audio, passes",
    [
        (5.0, 4.0, ["cond", "drop_text", "uncond"]),
        (5.0, 1.0, ["cond", "drop_text", "uncond"]),
        (1.0, 2.0, ["cond", "drop_audio"]),
        (1.0, 1.0, ["cond"]),
        (1.0 + 1e-12, 1.0, ["cond"]),
    ],
)
def test_pass_rule(text, audio, passes):
    assert passes_for(text, audio) == passes


def test_pass_rule_rejects_bad_scale():
    with pytest.raises(OptionError, match="option 'audio_scale' must be a number of at least 0"):
        passes_for(5.0, -1.0)


def _preds():
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(2, 3, 4, 4, generator=g) for k in ("cond", "drop_text", "uncond", "drop_audio")}


def test_combine_formulas():
    p = _preds()
    three = combine(p, 5.0, 4.0)
    assert torch.allclose(three, p["uncond"] + 5 * (p["cond"] - p["drop_text"]) + 4 * (p["drop_text"] - p["uncond"]))
    two = combine(p, 1.0, 2.0)
    assert torch.allclose(two, p["drop_audio"] + 2 * (p["cond"] - p["drop_audio"]))
    assert combine({"cond": p["cond"]}, 1.0, 1.0) is p["cond"]
    with pytest.raises(ValueError, match="missing \\['uncond'\\]"):
        combine({"cond": p["cond"], "drop_text": p["cond"]}, 5.0, 4.0)


def test_apg_orthogonal_clipped_and_momentum():
    p = _preds()
    p["drop_text"] = p["cond"] - 100 * torch.ones_like(p["cond"])  # huge text difference: gets clipped to norm 55
    state = APGState()
    out = combine(p, 2.0, 1.0, apg_state=state)
    text_part = out - p["cond"]  # (s_t−1)=1 · APG(cond − drop_text); audio term has (s_a−1) = 0
    assert float((text_part * p["cond"]).sum()) == pytest.approx(0.0, abs=1e-3)  # orthogonal to cond
    assert float(text_part.norm()) <= 55.0 + 1e-3
    # momentum: the buffer now holds diff; the next call sees diff + (−0.75)·diff = 0.25·diff
    first = state.text.average.clone()
    combine(p, 2.0, 1.0, apg_state=state)
    assert torch.allclose(state.text.average, 0.25 * first)
    state.reset()
    assert state.text.average is None and state.audio.average is None
    # 2-pass APG uses the audio buffer only
    combine(p, 1.0, 3.0, apg_state=state)
    assert state.audio.average is not None and state.text.average is None
