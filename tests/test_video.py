"""``vtr.video.load_video`` on videos written here with PyAV: frame i is filled with the value 10 * i, so a frame
tells which one it is."""
import numpy as np
import pytest
from PIL import Image

from vtr.video import load_video

av = pytest.importorskip("av")
pytest.importorskip("decord")

FRAMES, RATE = 24, 8                    # 3 seconds


def write(path, codec="libx264", frames=FRAMES, rate=RATE):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((32, 32, 3), 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def which(video) -> list[int]:
    """The frame numbers the pixels say (lossy codecs: the nearest multiple of 10)."""
    return [int(round(float(f.mean()) / 10)) for f in video.frames]


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.webm", "libvpx"), ("clip.avi", "mpeg4")])
def test_uniform_sampling_reads_the_middle_of_each_segment(tmp_path, name, codec):
    video = load_video(write(tmp_path / name, codec), num_frames=4)
    assert video.indices == [3, 9, 15, 21] and which(video) == [3, 9, 15, 21]    # 24 frames, 4 segments of 6
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.timestamps == [3 / 8, 9 / 8, 15 / 8, 21 / 8] and video.fps == 8


def test_fps_sampling_and_a_time_range(tmp_path):
    path = write(tmp_path / "clip.mp4")
    assert load_video(path, fps=2).indices == [0, 4, 8, 12, 16, 20]            # every 0.5 s at 8 fps
    assert load_video(path, start=1.0, end=2.0).indices == list(range(8, 16))
    assert load_video(path, num_frames=2, start=1.0, end=2.0).indices == [10, 14]
    assert load_video(path).frames.shape[0] == FRAMES


def test_directory_of_frames(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(tmp_path / f"f{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    video = load_video(tmp_path, num_frames=3, frame_rate=2.0)
    assert video.indices == [1, 3, 5] and which(video) == [1, 3, 5] and video.timestamps == [0.5, 1.5, 2.5]


def test_bad_videos_get_clear_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot read video .*corrupt.mp4"):
        load_video(corrupt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no frames"):
        load_video(tmp_path / "empty")
    clip = write(tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="clip.mp4: 30 frames asked for, but .* holds 24"):
        load_video(clip, num_frames=30)
    with pytest.raises(ValueError, match="more frames than the video's 8 fps"):
        load_video(clip, fps=30)
    with pytest.raises(ValueError, match="empty or outside"):
        load_video(clip, start=5)
    with pytest.raises(ValueError, match="not both"):
        load_video(clip, num_frames=2, fps=1)
