"""Offload settings take effect through diffusers' group-offloading hooks (here with onload and offload device both
"cpu": the hooks, groups, prefetch order and outputs are what a GPU run uses; only the copies are no-ops), and are
refused where there is no GPU to offload from."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.hooks import group_offloading

from infinite_talk.errors import OptionError
from infinite_talk.models import diffusers_adapter, offload
from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.offload import (
    apply_block_swap,
    apply_sequential,
    blocks_in_flight,
    offload_after_use,
    offloaded_blocks,
    offloaded_groups,
    remove_offload,
    swapped_block_indices,
)
from infinite_talk.models.placement import Offload
from infinite_talk.models.quantize import quantize_transformer, weight_bytes
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.options import LoadOptions, parse_offload
from infinite_talk.plan.planner import resolve
from infinite_talk.presets.tiny_transformer import random_transformer_inputs
from infinite_talk.testing.machines import simulated

G6 = dataclasses.replace(GEOMETRY_TINY, dit=dataclasses.replace(GEOMETRY_TINY.dit, num_layers=6))


def six_block_model() -> InfiniteTalkTransformer:
    torch.manual_seed(0)
    model = InfiniteTalkTransformer.from_dit_config(G6.dit).eval().requires_grad_(False)
    with torch.no_grad():  # a non-zero head and modulation, so every block changes the output
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def record_swaps(model, groups) -> list[tuple[str, int]]:
    """("onload"|"offload"|"run", block) events, in order, as the model runs."""
    events = []
    for name, group in groups.items():
        i = int(name.split(".")[1])
        for kind in ("onload_", "offload_"):
            original = getattr(group, kind)
            setattr(group, kind, lambda i=i, kind=kind, original=original: (events.append((kind[:-1], i)),
                                                                             original())[1])
    for i, block in enumerate(model.blocks):
        block.attn1.register_forward_pre_hook(lambda *_, i=i: events.append(("run", i)))
    return events


def run(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(**random_transformer_inputs(G6))


def test_the_hook_name_is_diffusers_own():
    assert diffusers_adapter.GROUP_OFFLOADING_HOOK == group_offloading._GROUP_OFFLOADING


@pytest.mark.parametrize("value, expected", [("auto", ("auto", 0)), ("none", ("none", 0)),
                                             ("sequential", ("sequential", 0)), ("blocks:1", ("blocks", 1)),
                                             ("blocks:40", ("blocks", 40))])
def test_offload_forms(value, expected):
    assert parse_offload(value) == expected
    assert LoadOptions(offload=value).validate().offload == value
    if value != "auto":  # the planner's typed setting: parsed once, printed back as the option's text
        placement = Offload.parse(value, 40, quantization="int8-weight-only")
        assert (placement.kind, placement.blocks, str(placement)) == (*expected, value)
        assert placement.swap == ("compact" if expected[0] == "blocks" else "")
        assert Offload.parse(value, 40).swap == ("diffusers" if expected[0] == "blocks" else "")


def test_auto_is_the_planners_to_resolve():
    with pytest.raises(OptionError, match="'auto' must be resolved by the planner first"):
        Offload.parse("auto", 40)


@pytest.mark.parametrize("value, message", [
    ("blocks:0", "offload=blocks:0: the transformer has 40 blocks; choose blocks:1 to blocks:40"),
    ("blocks:41", "offload=blocks:41: the transformer has 40 blocks; choose blocks:1 to blocks:40"),
    ("blocks", "offload: unknown value 'blocks'; choose auto, none, sequential or blocks:N"),
    ("model", "offload: unknown value 'model'; choose auto, none, sequential or blocks:N"),
])
def test_bad_offload_forms_are_refused(value, message):
    with pytest.raises(OptionError) as err:
        LoadOptions(offload=value).validate()
    assert str(err.value).startswith(message)


def test_block_count_of_the_model_in_use_is_checked():
    with pytest.raises(OptionError, match=r"offload=blocks:3: the transformer has 2 blocks; choose blocks:1 to "
                                          r"blocks:2"):
        resolve(LoadOptions(preset="tiny", offload="blocks:3"), simulated("h100"))


def test_swapped_blocks_are_spread_so_a_resident_block_precedes_each():
    assert swapped_block_indices(40, 1) == [39]
    assert swapped_block_indices(40, 20) == list(range(1, 40, 2))
    assert swapped_block_indices(40, 40) == list(range(40))
    assert swapped_block_indices(40, 3) == [12, 25, 39]
    for n in range(1, 41):
        chosen = swapped_block_indices(40, n)
        assert len(set(chosen)) == n and chosen == sorted(chosen) and chosen[-1] == 39
        assert blocks_in_flight(40, n) == (1 if n <= 20 else 2)


def test_offload_other_than_none_is_refused_without_a_gpu():
    for value in ("blocks:2", "sequential"):
        with pytest.raises(OptionError) as err:
            resolve(LoadOptions(offload=value), simulated("cpu"))
        assert str(err.value) == (f"offload={value}: offload moves weights between GPU and host; this machine has "
                                  "no GPU")
    with pytest.raises(OptionError, match="offload=blocks:2: offload moves weights between GPU and host; this run "
                                          "uses device=cpu"):
        resolve(LoadOptions(offload="blocks:2", device="cpu"), simulated("h100"))
    plan = resolve(LoadOptions(offload="auto"), simulated("cpu"))
    assert plan.offload == Offload("none") and plan.options["offload"].effective == "none"


def test_block_swap_hooks_exactly_n_blocks_prefetches_and_keeps_the_output():
    model = six_block_model()
    expected = run(model)
    report = apply_block_swap(model, 2, "cpu", use_stream=False, prefetch=True)
    assert offloaded_blocks(model) == [2, 5] == report["swapped_blocks"]
    assert set(offloaded_groups(model)) == {"blocks.2", "blocks.5"}
    groups = offloaded_groups(model)
    assert all(not g.onload_self and g.modules == [model.blocks[int(n.split(".")[1])]] for n, g in groups.items())
    # a resident block starts each swapped block's copy: the block just before it
    triggers = {i for i, b in enumerate(model.blocks) if getattr(b, "_diffusers_hook", None)
                and b._diffusers_hook.get_hook(offload._PREFETCH)}
    assert triggers == {1, 4}
    assert report["swapped_bytes"] == sum(weight_bytes(model.blocks[i]) for i in (2, 5))

    events = record_swaps(model, groups)
    assert torch.equal(run(model), expected)
    for i in (2, 5):
        first_onload = events.index(("onload", i))
        assert first_onload < events.index(("run", i - 1)) < events.index(("run", i))  # copied while i-1 runs
        assert events.index(("run", i)) < events.index(("offload", i))  # and dropped after it ran
    assert events.index(("offload", 2)) < events.index(("run", 3))  # one swapped block at a time here


def test_all_blocks_swapped_chain_their_copies():
    model = six_block_model()
    expected = run(model)
    apply_block_swap(model, 6, "cpu", use_stream=False, prefetch=True)
    assert offloaded_blocks(model) == list(range(6))
    hooks = [b._diffusers_hook.get_hook(diffusers_adapter.GROUP_OFFLOADING_HOOK) for b in model.blocks]
    assert [h.next_group for h in hooks[:-1]] == [h.group for h in hooks[1:]]  # block i starts block i+1's copy
    assert model._diffusers_hook.get_hook(offload._PREFETCH).group is hooks[0].group  # the model starts block 0
    assert torch.equal(run(model), expected)
    remove_offload(model)
    assert offloaded_groups(model) == {} and torch.equal(run(model), expected)


@pytest.mark.parametrize("mode, tensor_type", [("int8-weight-only", "Int8Tensor"), ("fp8-storage", "Float8Tensor"),
                                               ("nf4", "NF4Tensor")])
def test_quantized_blocks_are_swapped_in_their_compact_form(mode, tensor_type):
    model = six_block_model()
    quantize_transformer(model, mode, "cpu")
    expected = run(model)
    report = apply_block_swap(model, 3, "cpu", use_stream=False, prefetch=True)
    assert report["mechanism"] == "compact (quantized tensors)"
    swapped = report["swapped_blocks"]
    assert offloaded_blocks(model) == swapped == [1, 3, 5]
    groups = offloaded_groups(model)
    assert all(isinstance(g, offload.CompactBlockGroup) for g in groups.values())
    full = sum(p.numel() * 4 for i in swapped for p in model.blocks[i].parameters())
    assert report["swapped_bytes"] < 0.5 * full

    events = record_swaps(model, groups)
    weights_seen = {}
    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_pre_hook(lambda module, _, i=i: weights_seen.update({i: module.net[2].weight}))
    assert torch.equal(run(model), expected)
    pool = groups["blocks.1"].slots
    assert all(g.slots is pool for g in groups.values()) and len(pool.buffers) == blocks_in_flight(6, 3) == 1
    slot_memory = {b.data_ptr() for buffers in pool.buffers for b in buffers}
    for i in swapped:
        assert type(weights_seen[i]).__name__ == tensor_type  # it ran on the compact copy, in the shared GPU slot
        assert {t.data_ptr() for t in offload._leaves(weights_seen[i])} <= slot_memory
        assert events.index(("onload", i)) < events.index(("run", i - 1)) < events.index(("run", i))  # prefetched
        assert events.index(("run", i)) < events.index(("offload", i))
    # after the call each swapped block points at its host copies again
    host = {id(entry[3]) for g in groups.values() for entry in g.entries}
    assert all(id(p) in host for i in swapped for p in model.blocks[i].parameters())
    remove_offload(model)
    assert offloaded_groups(model) == {} and torch.equal(run(model), expected)


@pytest.mark.parametrize("mode", ["int8-weight-only", "fp8-storage", "nf4"])
def test_compact_copy_keeps_the_quantized_form_and_moves_every_inner_tensor(mode):
    """What the GPU copy does, checked with the meta device (no GPU here): the subclass, its inner tensors and its
    recorded device all move; nothing is dequantized."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    model = six_block_model()
    quantize_transformer(model, mode, "cpu")
    weight = model.blocks[0].ffn.net[0].proj.weight
    moved = offload.copy_tensor(weight, "meta")
    assert type(moved) is type(weight) and moved.shape == weight.shape and moved.device.type == "meta"
    names, _ = moved.__tensor_flatten__()
    inner = [getattr(moved, n) for n in names]
    assert inner and all(t.device.type == "meta" and not is_traceable_wrapper_subclass(t) for t in inner)
    back = offload.copy_tensor(weight, "cpu")
    x = torch.randn(3, weight.shape[1])
    assert torch.equal(torch.nn.functional.linear(x, back), torch.nn.functional.linear(x, weight))


def test_sequential_streams_every_layer():
    model = six_block_model()
    expected = run(model)
    report = apply_sequential(model, "cpu", use_stream=False)
    groups = offloaded_groups(model)
    layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv3d)}
    assert layers <= set(groups) and report["groups"] == len(groups)
    assert torch.equal(run(model), expected)


def test_encoders_leave_the_gpu_after_use():
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     feed_forward_proj="gated-gelu")).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14)).eval()
    ids, mask = torch.randint(0, 64, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        t5_expected = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        clip_expected = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    apply_sequential(t5, "cpu", use_stream=False, low_cpu_mem_usage=True)  # T5: streamed layer by layer
    assert {n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)} <= set(offloaded_groups(t5))
    offload_after_use(clip, "cpu")  # CLIP: moved for its call
    group = offloaded_groups(clip)[""]
    calls = []
    for kind in ("onload_", "offload_"):
        original = getattr(group, kind)
        setattr(group, kind, lambda kind=kind, original=original: (calls.append(kind), original())[1])
    with torch.no_grad():
        assert torch.equal(t5(input_ids=ids, attention_mask=mask).last_hidden_state, t5_expected)
        assert torch.equal(clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2], clip_expected)
    assert calls == ["onload_", "offload_"]
