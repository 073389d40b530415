"""Media: reference image/video reading, buckets, resize/crop, masks, colour correction, MP4 writing/probing."""

import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from infinite_talk.errors import InputError, OptionError
from infinite_talk.media.color import color_correct
from infinite_talk.media.frames import (
    FrameSource,
    bucket_for,
    person_masks,
    read_image,
    resize_and_centercrop,
    to_model_frame,
)
from infinite_talk.media.mp4 import frames_to_uint8, probe_media, write_mp4

EXAMPLES = Path(__file__).parent / "data" / "examples"


def _png_header_only(path: Path, w: int, h: int) -> None:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------- input files

def test_read_image_examples():
    img = read_image(EXAMPLES / "portrait.png")
    assert img.mode == "RGB" and img.size == (512, 512)
    assert read_image(EXAMPLES / "portrait_landscape.png").size == (512, 290)


def test_read_image_rejects_non_images_and_absurd_sizes(tmp_path):
    fake = tmp_path / "face.png"
    fake.write_text("this is not a picture")
    with pytest.raises(InputError, match=r"face\.png: not a readable image .*give a PNG, JPEG or WebP picture"):
        read_image(fake)
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 20000, 20000)
    with pytest.raises(InputError, match=r"huge\.png: the image is larger than this tool accepts .*400000000 pixels"):
        read_image(huge)
    wide = tmp_path / "wide.png"
    _png_header_only(wide, 9000, 100)
    with pytest.raises(InputError, match=r"wide\.png: the image is 9000×100 pixels, larger than this tool accepts"):
        read_image(wide)
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match=r"face\.png: not a readable image"):
        FrameSource(fake)


def test_video_source_reference_clip():
    src = FrameSource(EXAMPLES / "reference_video.mp4")
    assert src.is_video and src.fps == 25.0 and src.num_frames == 100 and src.duration == pytest.approx(4.0)
    assert (src.width, src.height) == (480, 480)
    last = np.asarray(src.frame_at(3.99))
    assert src.index_at(3.99) == 99 and src.index_at(2.88) == 72
    assert np.array_equal(np.asarray(src.frame_at(60.0)), last)  # past the end: the last frame is reused
    assert np.array_equal(np.asarray(src.frame_at(0.0)), np.asarray(src.first_frame()))


def test_video_keyframe_by_time_at_source_fps(tmp_path):
    # a 10 fps video whose frame i is grey level 20·i: time t shows frame floor(10·t), not frame 25·t (D13)
    frames = np.stack([np.full((64, 64, 3), 20 * i, np.uint8) for i in range(10)])
    path = write_mp4(tmp_path / "ten_fps.mp4", frames, fps=10, crf=0)
    src = FrameSource(path)
    assert src.fps == 10.0 and src.num_frames == 10 and src.duration == pytest.approx(1.0)
    assert src.index_at(72 / 25) == 9  # beyond the end
    assert src.index_at(0.25) == 2
    assert np.asarray(src.frame_at(0.25)).mean() == pytest.approx(40, abs=2)
    assert np.asarray(src.frame_at(0.05)).mean() == pytest.approx(0, abs=2)
    assert np.asarray(src.frame_at(0.9)).mean() == pytest.approx(180, abs=2)


# ------------------------------------------------------------------------------------------------------ buckets

@pytest.mark.parametrize(
    "h, w, size, bucket",
    [
        (1080, 1920, 480, (448, 896)),  # 16:9 landscape (docs/REFERENCE.md §3.1 example)
        (290, 512, 480, (448, 896)),
        (512, 512, 480, (640, 640)),
        (1920, 1080, 480, (832, 448)),  # 9:16 portrait: ratio 1.78 → key 1.86
        (1080, 1920, 720, (704, 1280)),
        (512, 512, 720, (960, 960)),
        (3000, 500, 480, (1280, 320)),  # beyond the table: the extreme bucket
    ],
)
def test_buckets(h, w, size, bucket):
    assert bucket_for(h, w, size) == bucket


def test_bucket_bad_size():
    with pytest.raises(OptionError, match=r"option 'size' must be one of \[480, 720\], got 1080"):
        bucket_for(100, 100, 1080)


def test_resize_and_centercrop_scale_and_offset():
    # 512×290 → scale max(448/290, 896/512) = 1.75 → 508×896 → crop 30 rows off the top
    arr = np.zeros((290, 512, 3), np.uint8)
    arr[:20] = 255  # 35 white rows after scaling, 5 left after the crop
    out = resize_and_centercrop(Image.fromarray(arr), (448, 896))
    assert out.shape == (1, 3, 1, 448, 896) and out.dtype == torch.float32
    assert out[0, :, 0, :3].min().item() == 1.0
    assert out[0, :, 0, 8:].max().item() == -1.0
    grey = resize_and_centercrop(Image.new("RGB", (300, 200), (51, 102, 255)), (640, 640))
    assert torch.allclose(grey[0, :, 0, 320, 320], torch.tensor([51, 102, 255]) / 255 * 2 - 1)


def test_to_model_frame_example():
    img = read_image(EXAMPLES / "portrait_landscape.png")
    x = to_model_frame(img, 480)
    assert x.shape == (1, 3, 1, 448, 896) and x.min() >= -1 and x.max() <= 1


# -------------------------------------------------------------------------------------------------------- masks

def test_masks_one_and_two_speakers():
    one = person_masks(512, 512, (640, 640), 1)
    assert one.shape == (3, 80, 80) and one.min().item() == 1.0
    boxes = [[0, 0, 256, 256], [256, 256, 512, 512]]  # rows first: top-left and bottom-right quarters
    two = person_masks(512, 512, (640, 640), 2, bbox=boxes)
    assert two[0, :40, :40].min() == 1 and two[0].sum() == 1600
    assert two[1, 40:, 40:].min() == 1 and two[1].sum() == 1600
    assert torch.equal(two[2], 1 - two[0] - two[1])
    default = person_masks(512, 512, (640, 640), 2)  # 5 % margins, left and right halves
    assert default[0, :, :40].sum() == default[0].sum() > 0 and default[1, :, 40:].sum() == default[1].sum() > 0
    assert default[0, 0].sum() == 0 and default[2, 0].min() == 1


def test_mask_errors():
    with pytest.raises(InputError, match=r"option 'bbox': box 2 \[10, 10, 600, 100\] lies outside the 512×512"):
        person_masks(512, 512, (640, 640), 2, bbox=[[0, 0, 100, 100], [10, 10, 600, 100]])
    with pytest.raises(InputError, match="option 'bbox': 1 boxes for 2 speakers"):
        person_masks(512, 512, (640, 640), 2, bbox=[[0, 0, 100, 100]])
    with pytest.raises(InputError, match="3 speakers given; InfiniteTalk supports 1 or 2 speakers"):
        person_masks(512, 512, (640, 640), 3)


# ------------------------------------------------------------------------------------------------------- colour

def _lab_stats(video):
    from skimage.color import rgb2lab

    lab = rgb2lab(((video.double() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0).numpy())
    return lab.mean(axis=(1, 2)), lab.std(axis=(1, 2))


def test_color_correction_matches_reference_stats():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 24, 24, generator=g) * 1.2 - 0.6
    video = torch.cat([ref * 0.5 - 0.3, ref * 0.8 + 0.1], dim=1)  # two colour-shifted frames
    out = color_correct(video, ref[:, 0], 1.0)
    assert out.shape == video.shape and out.dtype == video.dtype
    ref_mu, ref_sd = _lab_stats(ref)
    mu, sd = _lab_stats(out)
    assert np.allclose(mu, ref_mu, atol=0.5) and np.allclose(sd, ref_sd, atol=0.5)
    assert color_correct(video, ref[:, 0], 0.0) is video  # 0 = untouched
    half = color_correct(video, ref[:, 0], 0.5)
    assert torch.allclose(half, (video + out) / 2, atol=1e-5)
    same = color_correct(ref, ref[:, 0], 1.0)
    assert torch.allclose(same, ref, atol=1e-3)  # already matching: unchanged
    with pytest.raises(OptionError, match="option 'color_correction' must be between 0 \\(off\\) and 1"):
        color_correct(video, ref[:, 0], 2.0)


# -------------------------------------------------------------------------------------------------------- mp4

def _speech():
    with av.open(str(EXAMPLES / "speech_en.wav")) as c:
        s = c.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="mono")
        parts = [r.to_ndarray() for f in c.decode(s) for r in resampler.resample(f)]
        return np.concatenate(parts, axis=1), s.rate


def test_frames_to_uint8_rounds_once():
    v = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 2 * (100.4 / 255) - 1, 2 * (100.6 / 255) - 1])
    out = frames_to_uint8(v.view(1, 1, 1, 7).expand(3, 1, 1, 7))
    assert out.shape == (1, 1, 7, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 100, 101]


def test_write_mp4_five_seconds_with_aac(tmp_path):
    samples, rate = _speech()
    assert rate == 16000 and samples.shape[1] / rate > 10  # 10.12 s of speech, cut to the video
    frames = np.zeros((125, 64, 96, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(125, dtype=np.uint8)[:, None, None] * 2
    chunks = (frames[i:i + 40] for i in range(0, 125, 40))  # streamed in chunks
    path = write_mp4(tmp_path / "out.mp4", chunks, fps=25, audio=(samples, rate))
    info = probe_media(path)
    assert info.frames == 125 and info.fps == 25.0 and info.video_duration == 5.0
    assert info.video_codec == "h264" and info.pix_fmt == "yuv420p" and (info.width, info.height) == (96, 64)
    assert info.audio_codec == "aac" and info.audio_sample_rate == 16000 and info.audio_channels == 1
    assert abs(info.audio_duration - 5.0) <= 0.064  # within one AAC frame (priming/padding)
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert abs(float(decoded[100][..., 0].mean()) - 200) < 3


def test_write_mp4_without_audio_and_errors(tmp_path):
    frames = np.full((3, 32, 32, 3), 90, np.uint8)
    info = probe_media(write_mp4(tmp_path / "silent.mp4", frames))
    assert info.frames == 3 and not info.has_audio
    with pytest.raises(InputError, match="H.264 yuv420p needs even width and height"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 33, 32, 3), np.uint8))
    with pytest.raises(OptionError, match="option 'crf' must be a whole number 0–51"):
        write_mp4(tmp_path / "x.mp4", frames, crf=99)
    with pytest.raises(InputError, match="the folder .* does not exist"):
        write_mp4(tmp_path / "nope" / "x.mp4", frames)
    with pytest.raises(InputError, match="no frames were written"):
        write_mp4(tmp_path / "empty.mp4", iter([]))
