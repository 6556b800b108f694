"""Video -> two kinds of sample: video prediction and video QA.

Video prediction (`VideoPredictionAdapter`): a folder of clips (video files or frame folders).
Window w of a clip takes k input frames `stride` apart and the next `predict` frames at the
same stride as the assistant's image targets: user [frames..., "What happens next?"],
assistant ["Here is what happens next:", next frame(s)]. Windows do not overlap; a clip gives
up to `windows_per_clip` samples, keyed clip * windows_per_clip + w, so keys never depend on
other clips. A clip too short for one window is quarantined as too_few_frames.

Video QA (`VideoQAAdapter`): LLaVA-format records whose `video` field names a clip. `frames`
frames are sampled uniformly (the centre of each of `frames` equal segments) and replace the
record's one `<video>` (or `<image>`) placeholder, so the result is an understanding sample
with several input images.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vpit.config import path_field
from vpit.errors import ConfigError
from vpit.pipelines.frames import FRAME_FORMATS, clip_paths, count_frames, decode_frames
from vpit.pipelines.ingest import Adapter, IngestError, RawRecord, check_adapter_config
from vpit.pipelines.llava import _messages, _parse  # the LLaVA turn rules, shared so both adapters agree
from vpit.pipelines.sample import Rejected, Sample, image_entry
from vpit.pipelines.tabular import plan_rows, read_rows
from vpit.pipelines.templates import load_templates

__all__ = ["VideoPredictionConfig", "VideoPredictionAdapter", "VideoQAConfig", "VideoQAAdapter", "window_frames"]


def _check_common(cfg: Any) -> None:
    check_adapter_config(cfg)
    if cfg.frame_format not in FRAME_FORMATS:
        raise ConfigError(f"frame_format: expected one of {FRAME_FORMATS}, got {cfg.frame_format!r}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VideoPredictionConfig:
    input: str = path_field()
    """Folder of clips: video files (mp4, mkv, webm, ...) and/or sub-folders of frame images."""
    source: str = "video"
    """Source name: the prefix of every sample id."""
    k: int = 4
    """Input frames per sample."""
    predict: int = 1
    """Frames the assistant predicts (image targets)."""
    stride: int = 1
    """Distance in frames between consecutive frames of a sample."""
    windows_per_clip: int = 1
    """Most samples taken from one clip (non-overlapping windows from its start)."""
    frame_format: str = "png"
    """How decoded video frames are stored: png (lossless) or jpeg. Frame-folder images are kept as they are."""
    shard_size: int = 100
    """Clips per shard."""
    templates: str | None = path_field(None)
    """Prompt templates YAML; none: the built-in templates/generation.yaml."""
    template_seed: int = 0
    """Seed of the per-sample template choice."""
    max_pixels: int = 64 * 1024 * 1024
    """Frames with more pixels are quarantined."""

    def __post_init__(self):
        for name in ("k", "predict", "stride", "windows_per_clip"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        _check_common(self)


def window_frames(cfg: VideoPredictionConfig, w: int) -> tuple[list[int], list[int]]:
    """Frame numbers of window w: (inputs, targets)."""
    start = w * (cfg.k + cfg.predict) * cfg.stride
    frames = [start + j * cfg.stride for j in range(cfg.k + cfg.predict)]
    return frames[: cfg.k], frames[cfg.k :]


def _listing_fingerprint(root: Path, paths: list[Path]) -> str:
    # Names, sizes and mtimes rather than contents: hashing every video on each run would read
    # the whole corpus on the driver. A file rewritten in place with the same size and mtime is missed.
    h = hashlib.sha256()
    for p in paths:
        files = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class VideoPredictionAdapter(Adapter):
    source_kind = "video"

    def __init__(self, config: VideoPredictionConfig):
        self.config = config
        self.root = Path(config.input)
        if not self.root.is_dir():
            raise IngestError(f"input: {config.input!r} is not a folder of clips")
        self.templates = load_templates(config.templates)

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.source_kind,
            **dataclasses.asdict(self.config),
            "templates_sha256": self.templates.sha256,
        }

    def input_fingerprint(self) -> str:
        return _listing_fingerprint(self.root, clip_paths(self.root))

    def plan(self) -> list[dict[str, Any]]:
        names = [p.name for p in clip_paths(self.root)]
        if not names:
            raise IngestError(f"{self.root} holds no clips (video files or folders of frames)")
        n = self.config.shard_size
        return [{"records": [i, min(i + n, len(names))], "clips": names[i : i + n]} for i in range(0, len(names), n)]

    def key(self, rec: RawRecord) -> str:
        return f"{rec.index:09d}"

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        cfg = self.config
        windows = [window_frames(cfg, w) for w in range(cfg.windows_per_clip)]
        wanted = {f for ins, outs in windows for f in ins + outs}
        for c, name in enumerate(task["clips"], start=task["records"][0]):
            base = c * cfg.windows_per_clip
            try:
                frames, seen = decode_frames(self.root / name, wanted, name, cfg.frame_format)
            except Rejected as e:
                yield RawRecord(base, {"uri": name}, e)
                continue
            need = windows[0][1][-1] + 1
            if windows[0][1][-1] not in frames:
                yield RawRecord(
                    base,
                    {"uri": name},
                    Rejected(
                        "too_few_frames",
                        f"{name}: {seen} frame(s), a sample needs {need} (k={cfg.k}, "
                        f"predict={cfg.predict}, stride={cfg.stride})",
                    ),
                )
                continue
            for w, (ins, outs) in enumerate(windows):
                if outs[-1] in frames:
                    origin = {"uri": name, "window": w, "input_frames": ins, "target_frames": outs}
                    yield RawRecord(base + w, origin, [frames[i] for i in ins + outs])

    def convert(self, rec: RawRecord) -> Sample:
        if isinstance(rec.raw, Rejected):
            raise rec.raw
        cfg = self.config
        numbers = rec.origin["input_frames"] + rec.origin["target_frames"]
        entries = [
            image_entry(i, data, f"{rec.origin['uri']} frame {f}", cfg.max_pixels)
            for i, (data, f) in enumerate(zip(rec.raw, numbers))
        ]
        prompt = self.templates.user("video_prediction", self.key(rec), cfg.template_seed)
        record = {
            "id": f"{cfg.source}:{rec.index:09d}",
            "source": cfg.source,
            "kind": "video",
            "messages": [
                {"role": "user", "content": [{"image": i} for i in range(cfg.k)] + [{"text": prompt}]},
                {
                    "role": "assistant",
                    "content": [{"text": self.templates.assistant("video_prediction")}]
                    + [{"image": cfg.k + t} for t in range(cfg.predict)],
                },
            ],
            "images": entries,
            "origin": rec.origin,
        }
        return Sample(record=record, images=list(rec.raw))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class VideoQAConfig:
    input: str = path_field()
    """JSON list or JSONL of LLaVA-format records with a `video` field."""
    video_root: str = path_field()
    """Folder that `video` paths are relative to; no path may leave it."""
    source: str = "videoqa"
    """Source name: the prefix of every sample id."""
    frames: int = 8
    """Frames sampled uniformly from each clip; shorter clips are quarantined."""
    frame_format: str = "png"
    """How decoded video frames are stored: png or jpeg."""
    shard_size: int = 1000
    """Input records per shard."""
    max_pixels: int = 64 * 1024 * 1024
    """Frames with more pixels are quarantined."""

    def __post_init__(self):
        if self.frames < 1:
            raise ConfigError(f"frames: expected an integer >= 1, got {self.frames}")
        _check_common(self)


def uniform_indices(total: int, n: int) -> list[int]:
    """The centre frame of each of n equal segments of a clip of `total` frames."""
    return [int((i + 0.5) * total / n) for i in range(n)]


class VideoQAAdapter(Adapter):
    source_kind = "videoqa"

    def __init__(self, config: VideoQAConfig):
        self.config = config
        self.input = Path(config.input)
        self.video_root = Path(config.video_root)
        if not self.input.is_file():
            raise IngestError(f"input: {config.input!r} is not a file")
        if not self.video_root.is_dir():
            raise IngestError(f"--video-root: {config.video_root!r} is not a folder")

    def input_fingerprint(self) -> str:
        return hashlib.sha256(self.input.read_bytes()).hexdigest()

    def plan(self) -> list[dict[str, Any]]:
        return plan_rows(self.input, self.config.shard_size)

    def read(self, task: dict[str, Any]) -> Iterator[RawRecord]:
        for index, origin, raw in read_rows(self.input, task):
            yield RawRecord(index, origin, raw)

    def _clip(self, rel: Any) -> Path:
        if not isinstance(rel, str) or not rel:
            raise Rejected("missing_field", f"video: expected a non-empty path string, got {rel!r}")
        path = (self.video_root / rel).resolve()
        if not path.is_relative_to(self.video_root.resolve()):
            raise Rejected("path_escape", f"video = {rel!r} resolves outside the video root {str(self.video_root)!r}")
        if not path.exists():
            raise Rejected("missing_video", f"video = {rel!r}: no such file or folder under the video root")
        return path

    def convert(self, rec: RawRecord) -> Sample | None:
        cfg = self.config
        record = _parse(rec.raw)
        if record is None:
            return None
        rel = record.get("video")
        path = self._clip(rel)
        turns = record.get("conversations")
        if isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
            turns = _expand_video_placeholder(turns, cfg.frames)
        messages = _messages({**record, "conversations": turns}, cfg.frames)  # validates the turns
        total = count_frames(path, f"video {rel}")
        if total < cfg.frames:
            raise Rejected("too_few_frames", f"video {rel}: {total} frame(s), sampling needs {cfg.frames}")
        indices = uniform_indices(total, cfg.frames)
        frames, seen = decode_frames(path, set(indices), f"video {rel}", cfg.frame_format)
        if len(frames) < len(set(indices)):  # fewer frames decode than packets: sample the real ones
            if seen < cfg.frames:
                raise Rejected("too_few_frames", f"video {rel}: {seen} decodable frame(s), sampling needs {cfg.frames}")
            indices = uniform_indices(seen, cfg.frames)
            frames, _ = decode_frames(path, set(indices), f"video {rel}", cfg.frame_format)
        images = [frames[i] for i in indices]
        entries = [
            image_entry(j, data, f"video {rel} frame {i}", cfg.max_pixels)
            for j, (data, i) in enumerate(zip(images, indices))
        ]
        origin = dict(rec.origin, video=rel, frames=indices)
        if "id" in record:
            origin["record_id"] = str(record["id"])
        out = {
            "id": f"{cfg.source}:{rec.index:09d}",
            "source": cfg.source,
            "kind": "understanding",
            "messages": messages,
            "images": entries,
            "origin": origin,
        }
        return Sample(record=out, images=images)


def _expand_video_placeholder(turns: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Replace the one `<video>` (or `<image>`) placeholder by n `<image>`s; prepend them if there is none."""
    found = [(j, tag) for j, t in enumerate(turns) for tag in ("<video>", "<image>") if tag in t["value"]]
    count = sum(t["value"].count("<video>") + t["value"].count("<image>") for t in turns)
    if count > 1:
        raise Rejected(
            "placeholder_mismatch",
            f"conversations hold {count} <video>/<image> placeholders; a video record has one (its frames go there)",
        )
    frames = "\n".join(["<image>"] * n)
    out = [dict(t) for t in turns]
    if found:
        j, tag = found[0]
        out[j]["value"] = out[j]["value"].replace(tag, frames)
    else:
        first_user = next((j for j, t in enumerate(turns) if t.get("from", t.get("role")) in ("human", "user")), None)
        if first_user is not None:
            out[first_user]["value"] = frames + "\n" + out[first_user]["value"]
    return out
