"""Short video clips: MP4 / WebM / GIF files or folders of frames <-> ``(C, T, H, W)`` in ``[0, 1]``
<-> model tensors in ``[-1, 1]``.

File I/O (``read_video`` / ``write_video``):

- MP4 (H.264, yuv420p) and WebM (VP9, yuv420p) go through the ffmpeg binary inside the
  imageio-ffmpeg wheel, which works offline. ``torchvision.io.write_video`` no longer exists and
  torchcodec cannot load FFmpeg libraries here, so neither is used. yuv420p subsamples chroma by 2,
  so odd heights and widths are padded by one replicated edge row/column before encoding.
- GIF goes through Pillow, in process (fast enough to materialize thousands of clips). GIF delays
  are stored in 1/100 s and Pillow merges identical consecutive frames into one longer frame, so
  the writer also stores the exact fps in a GIF comment and the reader expands long frames back
  to the constant frame rate: ``T`` frames written are ``T`` frames read.
- A folder of images (``0000.png``, ``0001.png``, ... in name order) is one clip; it has no fps
  of its own.

A raw clip is ``(C, T, H, W)`` float32 in ``[0, 1]`` (the layout of the model tensor, so that
``decode`` is a rescale), whatever the file stored.
"""

from __future__ import annotations

import json
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.adapters.base import Adapter, GenerationOption, mask_plane, random_box_keep, uniform_int

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
"""Containers read through ffmpeg (writing: ``.mp4`` and ``.webm``)."""
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image files that make up a frame folder."""
GIF_COMMENT = "multidiff fps="
"""Prefix of the GIF comment that records the exact frame rate (GIF delays are in 1/100 s)."""


class VideoIOError(OSError):
    """A clip cannot be read or written; the message names the file and what to do."""


# --- reading ----------------------------------------------------------------------------------


def read_video(path: str | Path, *, channels: int = 3) -> tuple[Tensor, float | None]:
    """Read a clip to ``(channels, T, H, W)`` float32 in ``[0, 1]`` and its fps (``None`` for folders).

    ``path`` is an ``.mp4``/``.webm``/``.mkv``/``.mov``/``.avi`` file, a ``.gif`` or a folder of
    images (one frame each, in name order). ``channels`` is 1 (grayscale) or 3 (RGB).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if path.is_dir():
        frames, fps = _read_frame_folder(path, channels), None
    elif not path.is_file():
        raise VideoIOError(f"video {path} does not exist")
    elif path.suffix.lower() == ".gif":
        frames, fps = _read_gif(path, channels)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        frames, fps = _read_ffmpeg(path, channels)
    else:
        raise VideoIOError(
            f"cannot read {path}: unknown video suffix {path.suffix!r}; use one of "
            f"{', '.join(VIDEO_SUFFIXES + ('.gif',))} or a folder of frames"
        )
    if len(frames) == 0:
        raise VideoIOError(f"{path} holds no frames")
    clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (T, H, W, C) -> (C, T, H, W)
    return clip.float() / 255, fps


def _read_ffmpeg(path: Path, channels: int) -> tuple[list[np.ndarray], float]:
    import imageio_ffmpeg

    pix_fmt = "gray" if channels == 1 else "rgb24"
    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt=pix_fmt, bpp=channels)
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, channels) for buf in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise VideoIOError(f"ffmpeg cannot decode {path}: {e}") from e
    return frames, float(meta["fps"])


def _read_gif(path: Path, channels: int) -> tuple[list[np.ndarray], float]:
    from PIL import Image, ImageSequence

    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as im:
        comment = im.info.get("comment", b"")
        pairs = [(np.asarray(f.convert(mode)).reshape(f.height, f.width, channels), f.info.get("duration", 0))
                 for f in ImageSequence.Iterator(im)]
    text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    durations = [d for _, d in pairs if d]
    if text.startswith(GIF_COMMENT):
        fps = float(text[len(GIF_COMMENT):])
    else:  # a foreign GIF: its shortest delay is one frame (browsers treat 0 as 100 ms)
        fps = 1000.0 / min(durations) if durations else 10.0
    frames = []
    for frame, duration in pairs:
        # Pillow stores a run of identical frames as one frame with the summed delay
        repeat = max(1, round(duration * fps / 1000)) if duration else 1
        frames.extend([frame] * repeat)
    return frames, fps


def _read_frame_folder(path: Path, channels: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted((p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)
    if not files:
        raise VideoIOError(f"frame folder {path} holds no images ({', '.join(FRAME_SUFFIXES)})")
    mode = "L" if channels == 1 else "RGB"
    frames = []
    for f in files:
        with Image.open(f) as im:
            frames.append(np.asarray(im.convert(mode)).reshape(im.height, im.width, channels))
    if len({fr.shape for fr in frames}) != 1:
        raise VideoIOError(f"frames in {path} differ in size; every frame of a clip must have the same size")
    return frames


def _natural_key(p: Path) -> list:
    """``frame2.png`` before ``frame10.png``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


# --- writing ----------------------------------------------------------------------------------


def write_video(clip: Tensor, path: str | Path, *, fps: float, crf: int = 12) -> Path:
    """Write ``clip`` ``(C, T, H, W)`` in ``[0, 1]`` (C = 1 or 3) to ``path``; its suffix picks the format.

    ``.mp4``: H.264 yuv420p (plays in browsers), quality ``crf`` (0-51, lower is better);
    ``.webm``: VP9 yuv420p; ``.gif``: Pillow, lossless for grayscale; no suffix: a folder of PNGs.
    Odd sizes are padded by one replicated edge row/column for the yuv420p formats.
    """
    path = Path(path)
    if clip.ndim != 4 or clip.shape[0] not in (1, 3):
        raise ValueError(f"a clip is (C, T, H, W) with C = 1 or 3, got shape {tuple(clip.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = (clip.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        _write_gif(frames, path, fps)
    elif suffix in (".mp4", ".webm"):
        _write_ffmpeg(frames, path, fps, crf)
    elif suffix == "":
        _write_frame_folder(frames, path)
    else:
        raise VideoIOError(
            f"cannot write {path}: unknown video suffix {suffix!r}; use .mp4, .webm or .gif "
            "(format=gif on the command line), or no suffix for a folder of PNG frames"
        )
    return path


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad ``(T, H, W, C)`` to even H and W by repeating the last row/column (yuv420p needs it)."""
    t, h, w, c = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_ffmpeg(frames: np.ndarray, path: Path, fps: float, crf: int) -> None:
    import imageio_ffmpeg

    frames = np.ascontiguousarray(_even(frames))
    t, h, w, c = frames.shape
    rate = str(Fraction(fps).limit_denominator(1001))  # exact for 8, 29.97 (30000/1001), 12.5 ...
    codec = (
        ["-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-movflags", "+faststart"]
        if path.suffix.lower() == ".mp4"
        else ["-c:v", "libvpx-vp9", "-b:v", "0", "-crf", str(min(63, crf + 18)), "-row-mt", "1"]
    )
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo",
        "-pix_fmt", "gray" if c == 1 else "rgb24", "-s", f"{w}x{h}", "-r", rate, "-i", "-",
        *codec, "-pix_fmt", "yuv420p", "-r", rate, str(path),
    ]
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise VideoIOError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace').strip()[-500:]}")


def _write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(f[:, :, 0] if f.shape[2] == 1 else f, mode="L" if f.shape[2] == 1 else "RGB")
              for f in frames]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0,
        optimize=False, comment=f"{GIF_COMMENT}{fps:g}".encode(),
    )


def _write_frame_folder(frames: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f[:, :, 0] if f.shape[2] == 1 else f).save(path / f"{i:04d}.png")


def gif_bytes(clip: Tensor, *, fps: float) -> bytes:
    """``clip`` ``(C, T, H, W)`` in ``[0, 1]`` as the bytes of an animated GIF (for loggers)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_video(clip, Path(d) / "clip.gif", fps=fps)
        return path.read_bytes()


# --- the adapter ------------------------------------------------------------------------------


class VideoAdapter(Adapter):
    """Clips of ``num_frames`` frames, every ``frame_stride``-th frame of the file, each frame resized
    (shorter side) and center-cropped to ``size``; grayscale or RGB; model tensors ``(C, T, H, W)``.

    Args:
        size: frame side (square) or ``(height, width)``.
        channels: 1 (grayscale) or 3 (RGB).
        num_frames: frames per clip ``T`` (generation may ask for another count: the 3-D backbones
            are convolutional in time).
        frame_stride: keep every ``frame_stride``-th frame of a file (temporal subsampling); the
            ``(num_frames - 1) * frame_stride + 1`` frames used are the middle of the file.
        fps: playback rate of written clips (and of generated ones unless ``fps=`` is given);
            a file's own fps is not resampled: ``frame_stride`` is the knob for that.
        antialias: antialias when downscaling frames.
        crf: H.264 quality of written MP4s (0-51, lower is better; 12 is near transparent).
        preview_columns: frames per row of the preview strip.
    """

    extensions = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")
    suffix = ".mp4"
    formats = ("mp4", "webm", "gif")

    def __init__(
        self,
        *,
        size: int | tuple[int, int] = 16,
        channels: int = 1,
        num_frames: int = 8,
        frame_stride: int = 1,
        fps: float = 8.0,
        antialias: bool = True,
        crf: int = 12,
        preview_columns: int = 8,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"modality.channels must be 1 or 3, got {channels}")
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("preview_columns", preview_columns)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"modality.{name} must be a positive integer, got {value!r}")
        if not fps > 0:
            raise ValueError(f"modality.fps must be positive, got {fps!r}")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.channels, self.num_frames, self.frame_stride = channels, num_frames, frame_stride
        self.fps, self.antialias, self.crf, self.preview_columns = float(fps), antialias, crf, preview_columns

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.num_frames, *self.size)

    def load(self, path: str | Path) -> Tensor:
        """Read a clip file or frame folder to ``(channels, T_file, h, w)`` in ``[0, 1]`` (all frames)."""
        return read_video(path, channels=self.channels)[0]

    def encode(self, raw: Tensor) -> Tensor:
        """``(C, T_file, h, w)`` in ``[0, 1]`` -> ``self.shape`` in ``[-1, 1]``: frames picked, resized, cropped."""
        x = self._channels(raw)
        return self.fit(x[:, self._frame_indices(x.shape[1])]).clamp(0, 1) * 2 - 1

    def _channels(self, raw: Tensor) -> Tensor:
        """A raw clip ``(C', T, h, w)`` as float with :attr:`channels` channels."""
        x = raw.float()
        if x.ndim != 4:
            raise ValueError(f"a raw clip is (C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[0] != self.channels:
            x = x.mean(0, keepdim=True) if self.channels == 1 else x[:1].expand(3, -1, -1, -1)
        return x

    def fit(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``(C, T, h, w)`` with every frame resized (shorter side) and center-cropped to ``size``
        (default :attr:`size`): the geometry of :meth:`encode`, which an editing mask follows too."""
        th, tw = size or self.size
        h, w = x.shape[-2:]
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            frames = x.permute(1, 0, 2, 3)  # frames as the batch of one 2-D resize
            frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", antialias=self.antialias, align_corners=False)
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = frames[:, :, top : top + th, left : left + tw].permute(1, 0, 2, 3)
        return x

    def _frame_indices(self, length: int) -> Tensor:
        span = (self.num_frames - 1) * self.frame_stride + 1
        if length < span:
            raise ValueError(
                f"the clip has {length} frames but modality.num_frames={self.num_frames} with "
                f"modality.frame_stride={self.frame_stride} needs {span}; lower num_frames or frame_stride, "
                "or leave such clips out (data.dataset.on_error=skip)"
            )
        start = (length - span) // 2
        return torch.arange(start, start + span, self.frame_stride)

    def decode(self, x0: Tensor) -> Tensor:
        """Model tensor ``(C, T, H, W)`` -> raw clip in ``[0, 1]``."""
        return ((x0.float() + 1) / 2).clamp(0, 1)

    def save(self, raw: Tensor, path: str | Path, *, fps: float | None = None) -> None:
        """Write a raw clip; the suffix of ``path`` picks MP4 / WebM / GIF (see :func:`write_video`)."""
        write_video(raw, path, fps=fps or self.fps, crf=self.crf)

    def preview(self, raw: Tensor) -> Tensor:
        """A ``(3, H', W')`` strip of the frames, ``preview_columns`` per row, on a gray frame border."""
        from torchvision.utils import make_grid

        frames = raw.float().clamp(0, 1).permute(1, 0, 2, 3)  # (T, C, H, W)
        if frames.shape[1] == 1:
            frames = frames.expand(-1, 3, -1, -1)
        return make_grid(frames, nrow=self.preview_columns, padding=1, pad_value=0.5)

    def generation_options(self) -> tuple[GenerationOption, ...]:
        return (
            GenerationOption("num_frames", int, None, f"frames per clip (default: duration x fps, else the training "
                             f"length, {self.num_frames})", minimum=0),
            GenerationOption("fps", float, self.fps, "playback frames per second of the written clips", minimum=0),
            GenerationOption("duration", float, None, "seconds per clip at fps, when num_frames is not given",
                             minimum=0),
            GenerationOption("height", int, None, f"frame height in pixels (default: the model's, {self.size[0]}); "
                             "transformers over patches and convolutional UNets take other sizes", minimum=0),
            GenerationOption("width", int, None, f"frame width in pixels (default: the model's, {self.size[1]})",
                             minimum=0),
        )

    def _frame_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        return (self.size[0] if height is None else int(height), self.size[1] if width is None else int(width))

    # -- editing ---------------------------------------------------------------------------------

    def region_options(self) -> tuple[GenerationOption, ...]:
        return (
            GenerationOption("keep_frames", list, None, "indices of the frames to keep from init (negative: from the "
                             "end); the others are generated: keep_frames=[0,-1] interpolates between the first and "
                             "last frame, keep_frames=[0,1,2,3] with num_frames=12 extends a clip"),
            GenerationOption("fill_frames", list, None, "indices of the frames to generate; the others are kept "
                             "from init"),
        )

    def input_options(self, raw: Tensor) -> dict:
        """The input's own length in frames (every ``frame_stride``-th frame)."""
        return {"num_frames": self._input_frames(raw)}

    def _input_frames(self, raw: Tensor) -> int:
        return (raw.shape[1] - 1) // self.frame_stride + 1

    def encode_input(self, raw: Tensor, *, num_frames: int | None = None, fps: float | None = None,
                     duration: float | None = None, height: int | None = None, width: int | None = None,
                     **_ignored) -> Tensor:
        """``(C, T_file, h, w)`` -> ``(C, T, H, W)``: every ``frame_stride``-th frame from the
        start, resized and cropped; frames past the end of the input are mid-gray (0)."""
        t, _ = self._frames_and_fps(num_frames, fps, duration)
        x = self._channels(raw)
        x = self.fit(x[:, :: self.frame_stride][:, :t], self._frame_size(height, width)).clamp(0, 1) * 2 - 1
        return F.pad(x, (0, 0, 0, 0, 0, t - x.shape[1]))

    def keep_mask(self, shape: tuple[int, ...], *, raw: Tensor | None = None, mask: Tensor | None = None,
                  keep_frames: list | None = None, fill_frames: list | None = None, **_ignored) -> Tensor | None:
        """``(1, T, H, W)``: 1 keeps the input. ``mask`` (an image, white: regenerate, the size of
        the input's frames) applies to every frame; frame indices pick whole frames; frames past
        the end of the input are always generated."""
        if mask is None and keep_frames is None and fill_frames is None:
            return None
        t, h, w = shape[1:]
        available = t if raw is None else min(t, self._input_frames(raw))
        keep = torch.ones(1, t, h, w)
        keep[:, available:] = 0
        if mask is not None:
            m = mask_plane(mask, tuple(raw.shape[-2:]) if raw is not None else (h, w), "a frame of the input")
            keep = keep * (1 - (self.fit(m[:, None], (h, w))[:, 0] >= 0.5).float())[:, None]
        if fill_frames is not None:
            keep[:, self._indices("fill_frames", fill_frames, t, t)] = 0
        if keep_frames is not None:
            inside = torch.zeros(1, t, 1, 1)
            inside[:, self._indices("keep_frames", keep_frames, t, available)] = 1
            keep = keep * inside
        return keep

    @staticmethod
    def _indices(name: str, indices: list, t: int, available: int) -> list[int]:
        out = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"{name}={indices!r} is invalid: give frame indices (integers; -1 is the last frame), "
                                 f"e.g. {name}=[0,-1]")
            j = i + t if i < 0 else i
            if not 0 <= j < t:
                raise ValueError(f"{name}={indices!r}: frame {i} is outside the {t} frames generated (0..{t - 1}, or "
                                 f"-{t}..-1 from the end)")
            if j >= available:
                raise ValueError(f"{name}={indices!r}: frame {i} is past the end of init ({available} frames), so "
                                 "there is nothing to keep there; keep frames of the input only")
            out.append(j)
        if not out:
            raise ValueError(f"{name}=[] is empty: give frame indices, e.g. {name}=[0,-1]")
        return out

    def random_keep_mask(self, dims: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """Frame subsets (T, H, W axes): an extension (the first frames kept), an interpolation
        (the first and last kept), a random subset of frames, or a box in every frame."""
        t = int(dims[0])
        kind = uniform_int(0, 3, generator)
        if t < 3 or kind == 3:
            return random_box_keep(dims, generator)
        keep = torch.zeros(1, *dims)
        if kind == 0:
            keep[:, : uniform_int(1, t - 1, generator)] = 1
        elif kind == 1:
            keep[:, [0, t - 1]] = 1
        else:
            chosen = torch.randperm(t, generator=generator, device=generator.device)[: uniform_int(1, t - 1, generator)]
            keep[:, chosen.cpu()] = 1
        return keep

    def _frames_and_fps(self, num_frames: int | None, fps: float | None, duration: float | None) -> tuple[int, float]:
        fps = self.fps if fps is None else fps
        if isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0:
            raise ValueError(f"fps={fps!r} is invalid: it must be a positive number")
        if num_frames is None:
            num_frames = self.num_frames if duration is None else max(1, round(duration * fps))
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames={num_frames!r} is invalid: it must be a positive integer")
        return num_frames, float(fps)

    def sample_shape(self, *, num_frames: int | None = None, fps: float | None = None,
                     duration: float | None = None, height: int | None = None, width: int | None = None,
                     **_ignored) -> tuple[int, ...]:
        """``(C, T, H, W)`` for generation: ``T = num_frames``, else ``round(duration * fps)``, else the
        default; ``H, W`` = ``height``, ``width``, else the model's frame size."""
        t, _ = self._frames_and_fps(num_frames, fps, duration)
        return (self.channels, t, *self._frame_size(height, width))

    def metadata(self, *, num_frames: int | None = None, fps: float | None = None,
                 duration: float | None = None, height: int | None = None, width: int | None = None,
                 **_ignored) -> dict:
        t, rate = self._frames_and_fps(num_frames, fps, duration)
        h, w = self._frame_size(height, width)
        return {"num_frames": t, "fps": rate, "height": h, "width": w}

    def save_options(self, *, fps: float | None = None, **_ignored) -> dict:
        """The playback fps for :meth:`save`."""
        return {"fps": self.fps if fps is None else float(fps)}

    def log_media(self, logger, raws: list[Tensor], prompts: list[str], step: int, out_dir: str | Path, *,
                  prefix: str = "") -> None:
        """Write the sample clips as GIFs to ``out_dir/step_NNNNNN/`` (with ``metadata.jsonl``) and, for
        TensorBoard, as animated images.

        TensorBoard's ``add_video`` needs moviepy only to encode a GIF; we encode it ourselves and
        write the same ``Summary.Image`` that ``add_video`` writes, so the clips play in the Images tab.
        """
        folder = Path(out_dir) / f"step_{step:06d}"
        if not (folder / "metadata.jsonl").is_file():  # called once per logger: write the files once
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for k, (raw, prompt) in enumerate(zip(raws, prompts)):
                self.save(raw, folder / f"{k:04d}.gif")
                rows.append({"file": f"{k:04d}.gif", "prompt": prompt, "step": step, "fps": self.fps})
            (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        experiment = getattr(logger, "experiment", None)
        get_writer = getattr(experiment, "_get_file_writer", None)
        if get_writer is None:  # CSV and other loggers keep no media: the run directory has the clips
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for k, raw in enumerate(raws):
            c, _, h, w = raw.shape
            image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(raw, fps=self.fps))
            values.append(Summary.Value(tag=f"{prefix}videos/{k:02d}", image=image))
        get_writer().add_summary(Summary(value=values), step)
