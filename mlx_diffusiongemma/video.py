"""Video frames for the prompt, laid out as Gemma 4's video processor does: frames sampled
uniformly (32 by default, or `fps` per second), each frame an image of at most 70 soft tokens
written as `mm:ss <|image>` + n × `<|video|>` + `<image|>`. The DiffusionGemma reference has no
video path; this follows Gemma 4. Decoding needs PyAV (`pip install "mlx-diffusiongemma[video]"`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

DEFAULT_FRAMES = 32
VIDEO_SOFT_TOKENS = 70


@dataclass
class VideoFrames:
    frames: List[np.ndarray]  # (H, W, 3) uint8 each
    timestamps: List[float]  # seconds


def sample_indices(
    total: int, num_frames: Optional[int], fps: Optional[float], video_fps: Optional[float]
) -> np.ndarray:
    """transformers' `default_sample_indices_fn`: `num_frames` evenly spread, or `fps` per
    second of video; every frame when the video has fewer."""
    if num_frames is not None and fps is not None:
        raise ValueError("give the number of video frames or the frame rate, not both")
    if num_frames is None and fps is not None:
        if not video_fps:
            raise ValueError("the video has no frame rate: sample a number of frames instead")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        num_frames = DEFAULT_FRAMES
    num_frames = min(num_frames, total)
    return np.arange(num_frames, dtype=int) * total // num_frames


def timestamp(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def read_video(path, num_frames: Optional[int] = None, fps: Optional[float] = None) -> VideoFrames:
    """Decodes the sampled frames of a video file as RGB."""
    try:
        import av
    except ImportError:
        raise ValueError('video needs PyAV: pip install "mlx-diffusiongemma[video]"') from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames
            # With a known frame count only the sampled frames are kept (memory stays bounded).
            wanted = None
            if total:
                wanted = set(sample_indices(total, num_frames, fps, video_fps).tolist())
            decoded = {}
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    decoded[i] = frame.to_ndarray(format="rgb24")
    except ValueError:
        raise
    except Exception as e:  # av.error.* for files that are not videos
        raise ValueError(f"video file {path} cannot be decoded ({type(e).__name__})") from None
    if not decoded:
        raise ValueError(f"video file {path} has no frames")
    if wanted is None or len(decoded) < len(wanted):  # no (or a wrong) count in the header
        idx = [sorted(decoded)[j] for j in sample_indices(len(decoded), num_frames, fps, video_fps)]
    else:
        idx = sorted(decoded)
    rate = video_fps or 24.0  # as Gemma 4's processor when the rate is unknown
    return VideoFrames([decoded[i] for i in idx], [i / rate for i in idx])
