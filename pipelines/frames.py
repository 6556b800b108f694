"""Frames of a clip: a video file decoded with PyAV, or a folder of frame images.

Both read the same way: `decode_frames(path, wanted)` returns the encoded bytes of the
wanted frame numbers and stops decoding after the last one, so a long clip is never held in
memory. Video frames are re-encoded (PNG by default: lossless, so a target is exactly the
decoded frame); frame-folder images are kept as they came. Failures raise `Rejected`.
"""

from __future__ import annotations

import io
from pathlib import Path

from vpit.pipelines.sample import Rejected

__all__ = ["FRAME_FORMATS", "IMAGE_EXTS", "VIDEO_EXTS", "clip_paths", "count_frames", "decode_frames", "frame_files"]

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FRAME_FORMATS = ("png", "jpeg")


def clip_paths(root: Path) -> list[Path]:
    """The clips in `root`, sorted by name: video files, and sub-folders (each a folder of frames)."""
    return sorted(p for p in root.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_EXTS)


def frame_files(folder: Path) -> list[Path]:
    """A frame folder's images in name order (name them 000001.png, 000002.png, ...)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _open(path: Path, where: str):
    import av

    try:
        container = av.open(str(path))
    except Exception as e:  # av raises many FFmpegError subclasses, and OSError
        raise Rejected("unreadable_video", f"{where}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise Rejected("unreadable_video", f"{where}: the file holds no video stream")
    return container


def count_frames(path: Path, where: str) -> int:
    """Number of frames, from the video stream's packets (demuxed, not decoded: one packet per
    frame, and far cheaper than decoding; container metadata is often missing or wrong). A file
    whose tail does not decode can count more than `decode_frames` then finds."""
    if path.is_dir():
        return len(frame_files(path))
    container = _open(path, where)
    try:
        return sum(1 for packet in container.demux(video=0) if packet.size)
    except Exception as e:
        raise Rejected("unreadable_video", f"{where}: reading failed: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def _encode(frame, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = frame.to_image()  # RGB PIL image
    img.save(buf, format="PNG" if fmt == "png" else "JPEG", **({"quality": 95} if fmt == "jpeg" else {}))
    return buf.getvalue()


def decode_frames(path: Path, wanted: set[int], where: str, fmt: str = "png") -> tuple[dict[int, bytes], int]:
    """Encoded bytes of the frames in `wanted` that exist, and how many frames were seen.

    Decoding stops after frame max(wanted), so the count is exact only when it is smaller.
    """
    if not wanted:
        return {}, 0
    last = max(wanted)
    if path.is_dir():
        files = frame_files(path)
        return {i: files[i].read_bytes() for i in sorted(wanted) if i < len(files)}, len(files)
    container = _open(path, where)
    out: dict[int, bytes] = {}
    seen = 0
    try:
        for i, frame in enumerate(container.decode(video=0)):
            seen = i + 1
            if i in wanted:
                out[i] = _encode(frame, fmt)
            if i >= last:
                break
    except Exception as e:
        raise Rejected(
            "unreadable_video", f"{where}: decoding failed at frame {seen}: {type(e).__name__}: {e}"
        ) from None
    finally:
        container.close()
    return out, seen
