"""Reading videos for VLMs: ``load_video`` samples frames from a video file (decord: mp4, webm, avi, ...) or a
directory of frames, reading only the frames it returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class Video:
    frames: np.ndarray            # (T, H, W, 3) uint8
    timestamps: list[float]       # seconds from the start of the video, one per frame
    indices: list[int]            # frame numbers in the source
    fps: float                    # the source's frame rate
    path: str


def _pick(count: int, rate: float, path, num_frames, fps, start, end) -> list[int]:
    duration = count / rate
    start = 0.0 if start is None else float(start)
    end = duration if end is None else min(float(end), duration)
    if not 0 <= start < end:
        raise ValueError(f"{path}: the range {start:g}s-{end:g}s is empty or outside the video (0s-{duration:g}s)")
    first, last = int(np.ceil(start * rate - 1e-9)), int(np.ceil(end * rate - 1e-9))      # frames in [start, end)
    available = last - first
    if num_frames is not None:
        if num_frames > available:
            raise ValueError(f"{path}: {num_frames} frames asked for, but {start:g}s-{end:g}s holds {available}")
        return [first + int((j + 0.5) * available / num_frames) for j in range(num_frames)]
    if fps is not None:
        if fps > rate:
            raise ValueError(f"{path}: sampling at {fps:g} fps asks for more frames than the video's {rate:g} fps")
        times = np.arange(start, end - 1e-9, 1.0 / fps)
        return sorted({min(last - 1, max(first, int(round(t * rate)))) for t in times})
    return list(range(first, last))


def load_video(path, num_frames: int | None = None, fps: float | None = None, start: float | None = None,
               end: float | None = None, frame_rate: float = 1.0) -> Video:
    """Frames of a video file or a directory of frames (sorted by name; ``frame_rate`` frames per second).

    ``num_frames``: that many frames, uniformly spread over [start, end) (each segment's middle frame); ``fps``:
    one frame every 1/fps seconds; neither: every frame in the range. ``start``/``end`` in seconds. Errors name the
    file: a missing path, an unreadable or corrupt file, a video without frames, a request for more frames than the
    range holds.
    """
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no frames (no image files in the directory)")
        indices = _pick(len(files), frame_rate, path, num_frames, fps, start, end)
        from PIL import Image

        frames = []
        for i in indices:
            try:
                with Image.open(files[i]) as im:
                    frames.append(np.asarray(im.convert("RGB")))
            except OSError as err:
                raise ValueError(f"cannot read frame {files[i]}: {err}") from None
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"{path}: frames of different sizes")
        return Video(np.stack(frames), [i / frame_rate for i in indices], indices, frame_rate, str(path))
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    except (RuntimeError, decord.DECORDError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read video {path}: {reason}") from None
    count = len(reader)
    if count == 0:
        raise ValueError(f"{path}: the video has no frames")
    rate = float(reader.get_avg_fps()) or 1.0
    indices = _pick(count, rate, path, num_frames, fps, start, end)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (RuntimeError, decord.DECORDError) as err:
        raise ValueError(f"cannot decode frames of {path}: {str(err).strip().splitlines()[-1]}") from None
    return Video(frames, [i / rate for i in indices], indices, rate, str(path))
