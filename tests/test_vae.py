"""Wan2.1 VAE loader: original / ComfyUI / diffusers layouts, wrapper semantics, precision, tiling, refusals."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from infinite_talk.errors import CheckpointError, InputError
from infinite_talk.models.configs import GEOMETRY_TINY as G
from infinite_talk.models.configs import VaeConfig
from infinite_talk.models.vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    convert_wan_vae_original_to_diffusers,
    load_vae,
)
from infinite_talk.presets import tiny_encoders as tiny


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return tiny.write_tiny_vae(tmp_path_factory.mktemp("vae"), G, seed=3)


def _video(frames=5, h=32, w=32, seed=0):
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_semantics_and_shapes(vae_file):
    vae = load_vae(vae_file, G)
    video = _video()
    latent = vae.encode(video)
    assert latent.shape == (1, 16, 2, 4, 4) and latent.dtype == torch.float32
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 16, 1, 1, 1)
    mu = vae.model.encode(video).latent_dist.mode()  # no sampling: the mean half of quant_conv
    torch.testing.assert_close(latent, (mu - mean) / std, rtol=1e-5, atol=1e-6)
    out = vae.decode(latent)
    assert out.shape == (1, 3, 5, 32, 32)
    raw = vae.model.decode(latent * std + mean).sample
    torch.testing.assert_close(out, raw.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(InputError, match=r"VAE input must be \[B,3,1\+4k,H,W\]"):
        vae.encode(_video(frames=4))
    with pytest.raises(InputError, match=r"VAE latent must be"):
        vae.decode(torch.zeros(1, 48, 1, 4, 4))


def test_layouts_agree(vae_file, tmp_path):
    video = _video(seed=1)
    ref = load_vae(vae_file, G).encode(video)
    original = torch.load(vae_file, weights_only=True)
    save_file({"model." + k: v for k, v in original.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    diff = tiny.tiny_vae_diffusers_state(G, seed=3)
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(diff, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": G.vae.dim,
                                                    "z_dim": 16, "num_res_blocks": G.vae.num_res_blocks}))
    save_file(diff, str(tmp_path / "diffusers_vae.safetensors"))
    for path in (tmp_path / "wan_2.1_vae.safetensors", folder, tmp_path / "diffusers_vae.safetensors"):
        torch.testing.assert_close(load_vae(path, G).encode(video), ref, rtol=0, atol=0)


def test_converter_matches_diffusers_on_the_real_stage_layout():
    """On the released [1,2,4,4] layout our converter equals diffusers' `convert_wan_vae_to_diffusers`."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    geo = dataclasses.replace(G, vae=VaeConfig(dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2))
    diff = tiny.tiny_vae_diffusers_state(geo, seed=0)
    original = tiny.convert_wan_vae_diffusers_to_original(diff, 4, 2)
    ours = convert_wan_vae_original_to_diffusers(original, 4, 2)
    theirs = convert_wan_vae_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(diff)
    assert all(ours[k] is theirs[k] for k in ours)


def test_tiny_geometry_needs_the_general_converter():
    # dim_mult (1,2,2,2) puts a decoder shortcut in stage 2, which diffusers' fixed index table misplaces.
    diff = tiny.tiny_vae_diffusers_state(G, seed=0)
    assert "decoder.up_blocks.2.resnets.0.conv_shortcut.weight" in diff
    original = tiny.convert_wan_vae_diffusers_to_original(diff, 4, 2)
    assert "decoder.upsamples.8.shortcut.weight" in original
    assert convert_wan_vae_original_to_diffusers(original, 4, 2).keys() == diff.keys()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_precision_is_applied(vae_file, dtype):
    vae = load_vae(vae_file, G, dtype=dtype)
    assert {p.dtype for p in vae.model.parameters()} == {dtype}
    video = _video(seed=2)
    ref = load_vae(vae_file, G).encode(video)
    got = vae.encode(video)
    assert got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
    assert not torch.equal(got, ref)


def test_tiling_option(vae_file):
    vae = load_vae(vae_file, G, tiling=True)
    assert vae.model.use_tiling
    vae.enable_tiling(tile_size=32, stride=24)
    video = _video(frames=1, h=48, w=48, seed=4)
    tiled = vae.encode(video)
    vae.disable_tiling()
    plain = vae.encode(video)
    assert tiled.shape == plain.shape == (1, 16, 1, 6, 6) and torch.isfinite(tiled).all()
    assert ((tiled - plain).norm() / plain.norm()).item() < 0.5


def test_refusals(vae_file, tmp_path):
    original = torch.load(vae_file, weights_only=True)
    wan22 = dict(original, **{"conv2.weight": torch.zeros(48, 48, 1, 1, 1)})
    torch.save(wan22, tmp_path / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match=r"^Not a Wan2\.1 VAE \(Wan2\.2\): .*Wan2\.2_VAE\.pth has 48 latent"):
        load_vae(tmp_path / "Wan2.2_VAE.pth", G)
    dec = original["decoder.conv1.weight"]
    light = dict(original, **{"decoder.conv1.weight": dec[: dec.shape[0] // 4]})
    save_file(light, str(tmp_path / "lightvaew2_1.safetensors"))
    with pytest.raises(CheckpointError, match=r"^Not a Wan2\.1 VAE \(lightVAE\): .*lightvaew2_1\.safetensors has a "
                                              r"pruned decoder \(4 channels instead of 16\)"):
        load_vae(tmp_path / "lightvaew2_1.safetensors", G)
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"^Not a Wan2\.1 VAE: .*other\.safetensors has neither"):
        load_vae(tmp_path / "other.safetensors", G)
    real = dataclasses.replace(G, vae=VaeConfig())
    with pytest.raises(CheckpointError, match=r"Not a Wan2\.1 VAE \(unknown\): .* decoder input width 16, expected 384"):
        load_vae(vae_file, real)
    with pytest.raises(CheckpointError, match=r"nothere\.pth: VAE file not found"):
        load_vae(tmp_path / "nothere.pth", G)
    cut = tmp_path / "cut.safetensors"
    save_file({"model." + k: v for k, v in original.items()}, str(cut))
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: file is truncated"):
        load_vae(cut, G)


def test_fused_kernels_decode_and_encode_as_diffusers_does(vae_file):
    """The fused norm + SiLU (its PyTorch path here), padding inside the convolutions, conv1's bias moved into norm2,
    native-dtype upsampling and several latent frames per causal step compute what diffusers' own loop computes."""
    from infinite_talk.models.vae import NormSiLU

    plain, fast = load_vae(vae_file, G), load_vae(vae_file, G)
    fast.use_fused_kernels(frames_per_step=3)
    assert sum(isinstance(m, NormSiLU) for m in fast.model.modules()) > 0
    assert all(isinstance(b.norm1, NormSiLU) and isinstance(b.nonlinearity, torch.nn.Identity)
               for b in fast.model.modules() if type(b).__name__ == "WanResidualBlock")
    assert sorted(plain.model.state_dict()) == sorted(fast.model.state_dict())
    latent = torch.randn(1, 16, 6, 4, 6, generator=torch.Generator().manual_seed(1))
    a, b = plain.decode(latent), fast.decode(latent)
    assert a.shape == b.shape == (1, 3, 21, 32, 48)
    assert (a - b).abs().max() < 1e-4
    video = _video(frames=17, h=32, w=48)
    a, b = plain.encode(video), fast.encode(video)
    assert a.shape == b.shape == (1, 16, 5, 4, 6)
    assert (a - b).abs().max() < 1e-4


_NORM_SILU_INTERPRETER = """
import json, os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from infinite_talk.models.vae_kernels import fused_norm_silu, norm_silu_reference
g = torch.Generator().manual_seed(1)
out = {}
for c in (96, 20):
    x = (torch.randn(1, c, 3, 5, 7, generator=g) * 3).contiguous(memory_format=torch.channels_last_3d)
    gamma = torch.randn(c, 1, 1, 1, generator=g)
    for silu, bias in ((True, None), (False, None), (True, torch.randn(c, generator=g))):
        got = fused_norm_silu(x, gamma, silu, bias)
        ref = norm_silu_reference(x, gamma, silu, bias)
        out[f"{c}-{silu}-{bias is None}"] = [float((got - ref).abs().max()),
                                             got.is_contiguous(memory_format=torch.channels_last_3d)]
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None and not os.environ.get("CI"),
                    reason="Triton is not installed here (CI installs it: the test extras)")
def test_norm_silu_kernel_matches_its_reference_in_the_interpreter():
    proc = subprocess.run([sys.executable, "-c", _NORM_SILU_INTERPRETER], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == 6
    for diff, channels_last in res.values():
        assert diff < 1e-5 and channels_last
