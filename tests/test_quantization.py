"""Every load option either takes effect or is refused with the planner's reason (the option matrix on this
machine); quantized tiny models keep parity with the float model; our external attention kernels are the ones
every attention module calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infinite_talk.errors import OptionError
from infinite_talk.loading import LoadedPlan
from infinite_talk.models.configs import GEOMETRY_TINY as G
from infinite_talk.models.quantize import quantize_text_encoder, quantize_transformer, weight_bytes
from infinite_talk.models.transformer_loading import load_transformer_from_state_dict, state_dict_in_original_layout
from infinite_talk.options import LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import probe
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state

pytestmark = pytest.mark.usefixtures("cache")  # a fresh tiny-preset cache (conftest)

MATRIX_FIELDS = ("model_precision", "vae_precision", "quantization", "t5_quantization", "attention")
QUANTIZED_TYPES = {"fp8-storage": "Float8Tensor", "fp8-compute": "Float8Tensor", "int8-weight-only": "Int8Tensor",
                   "nf4": "NF4Tensor"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _block_linear_weights(model):
    return [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".blocks." in
            f".{name}"]


def _assert_took_effect(pipe: InfiniteTalkPipeline, field: str, value: str, plan: LoadedPlan) -> None:
    """The resolved value is visible in the loaded models themselves, not only in the plan."""
    effective = plan.plan.options[field].effective
    block = pipe.transformer.blocks[0]
    if field == "model_precision":
        assert block.attn1.to_q.weight.dtype == TORCH_DTYPES[value]
        assert block.norm2.weight.dtype == torch.float32  # kept fp32 like the reference
    elif field == "vae_precision":
        assert next(pipe.vae.model.parameters()).dtype == TORCH_DTYPES[value]
    elif field == "quantization":
        kinds = {type(w).__name__ for w in _block_linear_weights(pipe.transformer)}
        assert kinds == ({"Parameter"} if value == "disabled" else {QUANTIZED_TYPES[effective]}), kinds
    elif field == "t5_quantization":
        kinds = {type(m.weight).__name__ for m in pipe.text_encoder.model.modules()
                 if isinstance(m, torch.nn.Linear)}
        assert kinds == ({"Parameter"} if value == "disabled" else {"Float8Tensor"}), kinds
    elif field == "attention":
        for module in (block.attn1.processor, block.attn2.processor, block.audio_cross_attn):
            assert module._attention_backend.value == plan.plan.attention_backend
    # and one real forward runs with it
    inputs = random_transformer_inputs(G, dtype=pipe.transformer.blocks[0].attn1.to_q.bias.dtype)
    with torch.inference_mode():
        out = pipe.transformer(**inputs)
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out.float()).all()


def test_option_matrix_each_value_runs_or_is_refused_with_the_plan_reason():
    """Every value of every load option on this machine: it loads and takes effect, or `load_models` raises exactly
    the planner's refusal — nothing else."""
    caps = probe()
    outcomes = {}
    for f in dataclasses.fields(LoadOptions):
        if f.name not in MATRIX_FIELDS:
            continue
        for value in f.metadata["choices"]:
            options = LoadOptions(preset="tiny", **{f.name: value})
            try:
                resolve(options, caps)
                expected_error = None
            except OptionError as err:
                expected_error = str(err)
            pipe = InfiniteTalkPipeline()
            if expected_error is not None:
                with pytest.raises(OptionError) as got:
                    pipe.load_models(options)
                assert str(got.value) == expected_error
                assert pipe.transformer is None  # refused before anything loaded
                outcomes[(f.name, value)] = "refused"
                continue
            plan = pipe.load_models(options)
            _assert_took_effect(pipe, f.name, value, plan)
            outcomes[(f.name, value)] = plan.plan.options[f.name].effective
    if not torch.cuda.is_available():  # what this CPU machine must answer
        assert outcomes[("quantization", "fp8")] == "fp8-storage"
        assert outcomes[("quantization", "int8")] == "int8-weight-only"
        assert outcomes[("quantization", "nf4")] == "nf4"
        assert outcomes[("quantization", "fp4")] == "refused"
        assert outcomes[("t5_quantization", "fp8")] == "fp8-storage"
        for kernel in ("flash_attn_2", "flash_attn_3", "sageattn", "sageattn_3"):
            assert outcomes[("attention", kernel)] == "refused"


@pytest.fixture(scope="module")
def original_state():
    return state_dict_in_original_layout(random_transformer_state(G, seed=3))


# Stated tolerances: relative L2 of the transformer output against the float32 model, same random weights.
PARITY = {"fp8-storage": 0.05, "int8-weight-only": 0.02, "nf4": 0.15}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(PARITY))
def test_quantized_transformer_parity(original_state, mode, dtype):
    reference = load_transformer_from_state_dict(original_state, G, torch.float32)
    with torch.inference_mode():
        expected = reference(**random_transformer_inputs(G))
    model = load_transformer_from_state_dict(original_state, G, dtype)
    before = weight_bytes(model)
    report = quantize_transformer(model, mode, "cpu")
    assert report["layers"] == len(_block_linear_weights(model)) == 15 * G.dit.num_layers
    assert report["weight_types"] == {QUANTIZED_TYPES[mode]: report["layers"]}
    assert report["weight_bytes"] < before
    with torch.inference_mode():
        out = model(**random_transformer_inputs(G, dtype=dtype))
    err = ((out.float() - expected).norm() / expected.norm()).item()
    assert err < PARITY[mode], err
    assert err > 1e-6  # the quantized weights are really used


def test_quantization_refuses_unknown_modes(original_state):
    model = load_transformer_from_state_dict(original_state, G, torch.float32)
    with pytest.raises(OptionError, match="quantization mode 'fp4_scaled' is not one of"):
        quantize_transformer(model, "fp4_scaled", "cpu")
    with pytest.raises(OptionError, match="t5_quantization=.nf4.: the plan resolves disabled or fp8-storage"):
        quantize_text_encoder(torch.nn.Linear(4, 4), "nf4")


def test_t5_fp8_storage_keeps_the_embeddings_close(cache):
    plain, fp8 = InfiniteTalkPipeline(), InfiniteTalkPipeline()
    plain.load_models(LoadOptions(preset="tiny"))
    fp8.load_models(LoadOptions(preset="tiny", t5_quantization="fp8"))
    a = plain.text_encoder.encode(["A person is talking."])[0]
    b = fp8.text_encoder.encode(["A person is talking."])[0]
    err = ((a - b).norm() / a.norm()).item()
    # e4m3 keeps 3 mantissa bits (≈2.5% per product); the gated FFN multiplies two such products per layer
    assert 1e-6 < err < 0.15, err
    assert weight_bytes(fp8.text_encoder.model) < weight_bytes(plain.text_encoder.model)


def test_external_attention_kernel_is_called_by_every_attention(original_state, monkeypatch):
    """Our processors route self, text/image cross and audio attention to an external kernel (fa3-fwd on Hopper);
    on CPU a counting SDPA stands in for it, so the wiring and the [B, L, H, D] layout are checked here."""
    from infinite_talk.models import attention_kernels

    calls = []

    def fake_fa3(q, k, v):
        calls.append(tuple(q.shape))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
        return out.transpose(1, 2)

    monkeypatch.setitem(attention_kernels.KERNELS, "fa3_fwd", fake_fa3)
    model = load_transformer_from_state_dict(original_state, G, torch.float32)
    with torch.inference_mode():
        expected = model(**random_transformer_inputs(G))
        model.set_attention_backend("fa3_fwd")
        out = model(**random_transformer_inputs(G))
    # per block: self, text cross, image cross, audio cross
    assert len(calls) == 4 * G.dit.num_layers
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model.set_attention_backend("native")
    calls.clear()
    with torch.inference_mode():
        model(**random_transformer_inputs(G))
    assert calls == []
