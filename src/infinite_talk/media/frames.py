"""Reference image / video input, buckets, resize + centre crop, person masks (docs/REFERENCE.md §3.1, §3.10).

Images are read with PIL and validated by content; videos with PyAV. A `FrameSource` gives the frame shown at a
time t (seconds) of the source at its own frame rate, reusing the last frame past the end (the product rule, not the
reference's raw index, docs/REFERENCE.md D13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from infinite_talk.errors import InputError, OptionError

MAX_SIDE = 8192  # pixels per side accepted for a reference image or video
MAX_PIXELS = 40_000_000

# ratio (h/w) → [target_h, target_w]
ASPECT_RATIO_627 = {
    "0.26": [320, 1216], "0.38": [384, 1024], "0.50": [448, 896], "0.67": [512, 768], "0.82": [576, 704],
    "1.00": [640, 640], "1.22": [704, 576], "1.50": [768, 512], "1.86": [832, 448], "2.00": [896, 448],
    "2.50": [960, 384], "2.83": [1088, 384], "3.60": [1152, 320], "3.80": [1216, 320], "4.00": [1280, 320],
}
ASPECT_RATIO_960 = {
    "0.22": [448, 2048], "0.29": [512, 1792], "0.36": [576, 1600], "0.45": [640, 1408], "0.55": [704, 1280],
    "0.63": [768, 1216], "0.76": [832, 1088], "0.88": [896, 1024], "1.00": [960, 960], "1.14": [1024, 896],
    "1.31": [1088, 832], "1.50": [1152, 768], "1.58": [1216, 768], "1.82": [1280, 704], "1.91": [1344, 704],
    "2.20": [1408, 640], "2.30": [1472, 640], "2.67": [1536, 576], "2.89": [1664, 576], "3.62": [1856, 512],
    "3.75": [1920, 512],
}
BUCKETS = {480: ASPECT_RATIO_627, 720: ASPECT_RATIO_960}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"}


def _check_size(path, w: int, h: int) -> None:
    if w < 16 or h < 16:
        raise InputError(f"{path}: the image is {w}×{h} pixels; give a picture of at least 16×16 pixels")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise InputError(f"{path}: the image is {w}×{h} pixels, larger than this tool accepts "
                         f"({MAX_SIDE} pixels per side, {MAX_PIXELS // 1_000_000} megapixels); downscale it first")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB picture as a viewer shows it: EXIF orientation applied, 16/32-bit grey scaled (not clipped) to
    8 bits, transparency (alpha or a palette's transparent colour) flattened onto white, CMYK/YCbCr converted."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I"):  # I;16*, I: 16-bit grey (PNG/TIFF) holds 0..65535; PIL's convert would clip at 255
        arr = np.asarray(image).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        raise InputError("floating-point pictures are not supported; save the picture as an 8- or 16-bit PNG")
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image (see `to_rgb`), validated by content (not by file name)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give the path of a PNG/JPEG/WebP picture or a video")
    try:
        with Image.open(path) as probe:
            w, h = probe.size
            _check_size(path, w, h)
            probe.load()
            image = to_rgb(probe)
    except InputError as err:
        if str(err).startswith(str(path)):
            raise
        raise InputError(f"{path}: {err}") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: the image is larger than this tool accepts ({MAX_SIDE} pixels per side, "
                         f"{MAX_PIXELS // 1_000_000} megapixels; {err}); downscale it first") from None
    except PermissionError:
        raise InputError(f"{path}: cannot be read (permission denied); check the file's permissions") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {err}); "
                         "give a PNG, JPEG or WebP picture") from None
    return image


def is_video(path: str | Path) -> bool:
    """True when the file holds a video stream with more than one frame (decided by content)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            stream = container.streams.video[0]
            if stream.codec_context.name in {"png", "mjpeg", "webp", "bmp", "tiff", "gif"} and (stream.frames or 0) <= 1:
                return False
            return True
    except (av.error.FFmpegError, OSError, ValueError):
        return False


class FrameSource:
    """A still image or a video: `frame_at(t)` → RGB PIL image of the frame shown at t seconds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file; give the path of a picture or a video")
        self._image: Image.Image | None = None
        if self.path.suffix.lower() in VIDEO_SUFFIXES or (_looks_not_image(self.path) and is_video(self.path)):
            self._open_video()
        else:
            self._image = read_image(self.path)
            self.fps = None
            self.num_frames = 1
            self.duration = None
            self.width, self.height = self._image.size

    @property
    def is_video(self) -> bool:
        return self._image is None

    def _open_video(self) -> None:
        import av

        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as err:
            raise InputError(f"{self.path}: not a readable video ({err}); give an MP4/MOV/MKV/WebM file") from None
        with container:
            if not container.streams.video:
                raise InputError(f"{self.path}: the file has no video stream; give a picture or a video")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate or rate <= 0:
                raise InputError(f"{self.path}: the video has no frame rate; re-encode it (e.g. ffmpeg -r 25)")
            self.fps = float(rate)
            self._rate = Fraction(rate)
            self.width, self.height = stream.codec_context.width, stream.codec_context.height
            _check_size(self.path, self.width, self.height)
            count = int(stream.frames or 0)
            if count <= 0:  # container without a frame count: count the packets (no decoding)
                count = sum(1 for pkt in container.demux(stream) if pkt.size and pkt.pts is not None)
        if count <= 0:
            raise InputError(f"{self.path}: the video has no frames; give a video with at least one frame")
        self.num_frames = count
        self.duration = self.num_frames / self.fps
        self._decoder = None  # (container, frame iterator, index of the next frame)
        self._current: tuple[int, Image.Image] | None = None

    def _decode_to(self, idx: int) -> Image.Image:
        """Sequential decoding with a cached position (keyframe requests of a run go forward in time)."""
        import av

        if self._current is not None and self._current[0] == idx:
            return self._current[1]
        if self._decoder is None or self._current is None or idx < self._current[0]:
            self.close()
            container = av.open(str(self.path))
            self._decoder = (container, container.decode(container.streams.video[0]))
            self._current = None
        _, frames = self._decoder
        try:
            while self._current is None or self._current[0] < idx:
                frame = next(frames)
                pos = 0 if self._current is None else self._current[0] + 1
                self._current = (pos, frame.to_image().convert("RGB"))
        except StopIteration:
            if self._current is None:
                raise InputError(f"{self.path}: the video has no decodable frames; re-encode it as H.264") from None
            self.num_frames = self._current[0] + 1  # fewer decodable frames than announced: reuse the last
        except av.error.FFmpegError as err:
            if self._current is None:
                raise InputError(f"{self.path}: the video cannot be decoded ({err}); re-encode it as H.264") from None
        return self._current[1]

    def close(self) -> None:
        if getattr(self, "_decoder", None) is not None:
            self._decoder[0].close()
            self._decoder = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def index_at(self, t: float) -> int:
        """Source frame index shown at time t: floor(t·fps) (with a small tolerance), last frame past the end."""
        if self._image is not None:
            return 0
        if t < 0:
            raise ValueError(f"negative time {t}")
        idx = int(math.floor(t * self.fps + 1e-6))
        return min(idx, self.num_frames - 1)

    def frame_at(self, t: float) -> Image.Image:
        if self._image is not None:
            return self._image
        return self._decode_to(self.index_at(t))

    def first_frame(self) -> Image.Image:
        return self.frame_at(0.0)


def _looks_not_image(path: Path) -> bool:
    try:
        with Image.open(path):
            return False
    except Exception:
        return True


def bucket_for(height: int, width: int, size: int = 480) -> tuple[int, int]:
    """(target_h, target_w) of the bucket whose ratio key is nearest to height/width (first one on ties)."""
    table = BUCKETS.get(size)
    if table is None:
        raise OptionError(f"option 'size' must be one of {sorted(BUCKETS)}, got {size!r}", option="size", value=size)
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    th, tw = table[key]
    return th, tw


def _crop_box(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return top, left


def _scaled_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    scale = max(th / h, tw / w)
    return math.ceil(scale * h), math.ceil(scale * w)


def resize_and_centercrop(image: Image.Image | np.ndarray, target: tuple[int, int]) -> torch.Tensor:
    """Scale by max(th/h, tw/w) (size rounded up, PIL bilinear), centre-crop to (th, tw) → [1,3,1,th,tw] in [−1,1]."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    th, tw = target
    w, h = image.size
    nh, nw = _scaled_size(h, w, th, tw)
    resized = image.resize((nw, nh), Image.BILINEAR)
    top, left = _crop_box(nh, nw, th, tw)
    arr = np.asarray(resized, dtype=np.uint8)[top:top + th, left:left + tw]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) * 2.0)[None, :, None]


def to_model_frame(image: Image.Image, size: int = 480) -> torch.Tensor:
    """Bucket choice + resize/crop of one reference frame → [1,3,1,H,W] in [−1,1]."""
    w, h = image.size
    return resize_and_centercrop(image, bucket_for(h, w, size))


# ----------------------------------------------------------------------------------------------------------- masks

@dataclass(frozen=True)
class PersonBox:
    row_min: int
    col_min: int
    row_max: int
    col_max: int


def _parse_boxes(bbox, num_persons: int, h: int, w: int) -> list[PersonBox] | None:
    if bbox is None:
        return None
    if isinstance(bbox, dict):  # {"person1": [...], "person2": [...]} as the reference JSON
        bbox = [bbox[k] for k in sorted(bbox)]
    boxes = list(bbox)
    if len(boxes) != num_persons:
        raise InputError(f"option 'bbox': {len(boxes)} boxes for {num_persons} speakers; give one "
                         "[row_min, col_min, row_max, col_max] box per speaker")
    out = []
    for i, box in enumerate(boxes):
        try:
            a, b, c, d = (int(v) for v in box)
        except (TypeError, ValueError):
            raise InputError(f"option 'bbox': box {i + 1} must be four numbers [row_min, col_min, row_max, col_max], "
                             f"got {box!r}") from None
        if not (0 <= a < c <= h and 0 <= b < d <= w):
            raise InputError(f"option 'bbox': box {i + 1} {[a, b, c, d]} lies outside the {w}×{h} reference image "
                             f"(need 0 ≤ row_min < row_max ≤ {h} and 0 ≤ col_min < col_max ≤ {w}; rows first)")
        out.append(PersonBox(a, b, c, d))
    return out


def check_boxes(bbox, num_persons: int, height: int, width: int) -> None:
    """Refuse boxes that do not fit the height×width reference or do not match the speakers (one box per speaker;
    one speaker may also give none)."""
    if num_persons not in (1, 2):
        raise InputError(f"{num_persons} speakers given; InfiniteTalk supports 1 or 2 speakers")
    _parse_boxes(bbox, num_persons, height, width)


def person_masks_source(height: int, width: int, num_persons: int = 1, bbox=None,
                        face_scale: float = 0.05) -> torch.Tensor:
    """[3,H,W] float 0/1 masks in source pixels: person 1, person 2, background (docs/REFERENCE.md §3.10)."""
    if num_persons not in (1, 2):
        raise InputError(f"{num_persons} speakers given; InfiniteTalk supports 1 or 2 speakers")
    if num_persons == 1:
        if bbox is not None:
            _parse_boxes(bbox, 1, height, width)  # validated; one speaker uses the whole frame as the reference does
        return torch.ones(3, height, width)
    boxes = _parse_boxes(bbox, 2, height, width)
    m1 = torch.zeros(height, width)
    m2 = torch.zeros(height, width)
    if boxes is not None:
        m1[boxes[0].row_min:boxes[0].row_max, boxes[0].col_min:boxes[0].col_max] = 1
        m2[boxes[1].row_min:boxes[1].row_max, boxes[1].col_min:boxes[1].col_max] = 1
    else:
        r0, r1 = int(height * face_scale), int(height * (1 - face_scale))
        half = width // 2
        c0, c1 = int(half * face_scale), int(half * (1 - face_scale))
        m1[r0:r1, c0:c1] = 1
        m2[r0:r1, half + c0:half + c1] = 1
    background = ((m1 + m2) == 0).float()
    return torch.stack([m1, m2, background])


def person_masks(height: int, width: int, target: tuple[int, int], num_persons: int = 1, bbox=None,
                 vae_stride: int = 8) -> torch.Tensor:
    """Masks at latent resolution: source masks resized+cropped (nearest) to the bucket, then nearest-resized to
    (th/8, tw/8) and thresholded `> 0` → [3, lat_h, lat_w] float 0/1."""
    masks = person_masks_source(height, width, num_persons, bbox)
    th, tw = target
    nh, nw = _scaled_size(height, width, th, tw)
    resized = F.interpolate(masks[None], size=(nh, nw), mode="nearest")[0]
    top, left = _crop_box(nh, nw, th, tw)
    cropped = resized[:, top:top + th, left:left + tw]
    lat = F.interpolate(cropped[None], size=(th // vae_stride, tw // vae_stride), mode="nearest")[0]
    return (lat > 0).float()
