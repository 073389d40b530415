"""Chunk bookkeeping of the streaming loop (docs/REFERENCE.md §3.3, §3.8)."""

import pytest
import torch

from infinite_talk.errors import InputError, OptionError
from infinite_talk.sampling.windows import audio_window, chunk_count, mirror_pad, plan_chunks


@pytest.mark.parametrize(
    "frames, chunks",
    [
        (1, 1),  # short audio is accepted (D7): one chunk, trimmed
        (81, 1),  # exactly one chunk
        (82, 2),  # one frame more needs a second chunk (81 + 72 = 153 frames generated)
        (153, 2),  # 81 + 72 fills two chunks exactly
        (154, 3),
        (250, 4),  # docs/REFERENCE.md §3.8 example: 10 s → 4 chunks → 297 frames → trimmed to 250
        (1000, 14),  # 81 + 13·72 = 1017 ≥ 1000
    ],
)
def test_chunk_count(frames, chunks):
    assert chunk_count(frames) == chunks
    plan = plan_chunks(frames)
    assert plan.num_chunks == chunks
    assert plan.frames_before_trim == 81 + 72 * (chunks - 1)
    assert plan.num_frames == frames


def test_chunk_count_errors():
    with pytest.raises(InputError, match="need at least one video frame"):
        chunk_count(0)
    with pytest.raises(OptionError, match="option 'frame_num' must be 4n\\+1"):
        chunk_count(100, frame_num=80)


def _emb(n):
    return torch.arange(n, dtype=torch.float32)[:, None] * torch.ones(1, 3)


def test_window_offsets_clamped_on_absolute_indices():
    w = audio_window(_emb(200), 72)
    assert w.shape == (81, 5, 3)
    assert w[0, :, 0].tolist() == [70, 71, 72, 73, 74]  # later chunks see real audio before their start
    w0 = audio_window(_emb(200), 0)
    assert w0[0, :, 0].tolist() == [0, 0, 0, 1, 2]
    assert w0[80, :, 0].tolist() == [78, 79, 80, 81, 82]


def test_mirror_pad_appends_reversed_tail():
    e = _emb(200)
    padded = mirror_pad(e, 225)  # 225 − 200 + 3 = 28 rows
    assert padded.shape[0] == 228
    assert padded[200:, 0].tolist() == list(range(199, 171, -1))
    assert mirror_pad(e, 199) is e  # long enough: untouched


def test_plan_reference_stream_200_frames():
    plan = plan_chunks(200, max_frames=1000)
    assert plan.audio_starts == (0, 72, 144)
    assert [plan.motion_frames_for(k) for k in range(3)] == [1, 9, 9]
    assert [plan.keyframe_index(k) for k in range(3)] == [0, 72, 144]
    assert [plan.keyframe_time(k) for k in range(3)] == [0.0, 2.88, 5.76]
    assert plan.pad_rows == (28,)
    assert plan.num_frames == 200 and plan.frames_before_trim == 225
    src = plan.output_frame_source()
    assert src[80].tolist() == [0, 80] and src[81].tolist() == [1, 9] and src[199].tolist() == [2, 55]
    assert [plan.chunk_output_frames(k) for k in range(3)] == [81, 72, 47]
    last = plan.window(2, [_emb(200)])
    assert last.shape == (1, 81, 5, 3)
    assert last[0, 80, :, 0].tolist() == [177, 176, 175, 174, 173]  # rows 222..226 = mirrored 177..173
    assert torch.equal(plan.window(1, [_emb(200)])[0], audio_window(_emb(200), 72))  # no padding before the end


def test_plan_short_audio_is_padded_and_trimmed():
    plan = plan_chunks(50)  # 2 s: the reference asserts (D7); the product makes one padded chunk
    assert plan.num_chunks == 1 and plan.num_frames == 50
    assert plan.pad_rows == (81 - 50 + 3,)
    w = plan.window(0, [_emb(50)])
    assert w.shape == (1, 81, 5, 3)
    assert w[0, 49, 2, 0].item() == 49 and w[0, 50, 2, 0].item() == 49 and w[0, 51, 2, 0].item() == 48


def test_plan_max_frames_cap():
    plan = plan_chunks(1000, max_frames=100)
    assert plan.num_chunks == 2 and plan.num_frames == 100 and plan.pad_rows == (0,)
    clip = plan_chunks(1000, max_frames=81)
    assert clip.num_chunks == 1 and clip.num_frames == 81
    uncapped = plan_chunks(1500)  # no silent 40 s cap (D4)
    assert uncapped.num_frames == 1500 and uncapped.num_chunks == chunk_count(1500) == 21


def test_plan_two_persons_and_errors():
    plan = plan_chunks([200, 200])
    w = plan.window(2, [_emb(200), _emb(200) + 0.5])
    assert w.shape == (2, 81, 5, 3) and torch.equal(w[1], w[0] + 0.5)
    with pytest.raises(InputError, match="audio track 2 is shorter than one video frame"):
        plan_chunks([200, 0])
    with pytest.raises(OptionError, match="option 'max_frames' must be a whole number of at least 1"):
        plan_chunks(200, max_frames=0)
    with pytest.raises(ValueError, match="plan has 2 audio tracks, got 1"):
        plan.window(0, [_emb(200)])
