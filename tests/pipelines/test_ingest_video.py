"""Video ingest: clips read back frame by frame, prediction targets are the real next frames,
video QA samples frames uniformly, bad clips are quarantined with exact counts."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vpit.demo.corpora import BAD_CLIP_CASES, moving_shape_frames, write_bad_clips, write_clips, write_videoqa_records
from vpit.pipelines.ingest import run_ingest
from vpit.pipelines.shards import Dataset
from vpit.pipelines.templates import load_templates
from vpit.pipelines.video import VideoPredictionAdapter, VideoPredictionConfig, VideoQAAdapter, VideoQAConfig

FRAMES = 16


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    mp4 = write_clips(root, 3, seed=1, frames=FRAMES)  # clip-0000..0002.mp4 (lossy H.264)
    # Lossless clips and frame folders under other names, in the same folder.
    mkv = write_clips(root / "x", 2, seed=2, frames=FRAMES, codec="ffv1", ext="mkv")
    folders = write_clips(root / "y", 2, seed=3, frames=FRAMES, as_folders=True)
    for c in mkv + folders:
        new = root / f"{Path(c['path']).parent.name}-{Path(c['path']).name}"
        Path(c["path"]).rename(new)
        c["path"] = new
    (root / "x").rmdir()
    (root / "y").rmdir()
    bad = write_bad_clips(root)
    return {"root": root, "mp4": mp4, "mkv": mkv, "folders": folders, "bad": bad}


def test_clips_read_back_frame_by_frame(clips):
    rng = np.random.default_rng(2)
    for clip in clips["mkv"]:  # lossless: every decoded frame equals the rendered one
        expected, _ = moving_shape_frames(rng, FRAMES, 32)
        decoded = _decode(clip["path"])
        assert len(decoded) == FRAMES
        for got, want in zip(decoded, expected):
            assert np.array_equal(got, np.asarray(want))
    rng = np.random.default_rng(1)
    for clip in clips["mp4"]:  # H.264 is lossy: close, and the moving shape is where it was drawn
        expected, _ = moving_shape_frames(rng, FRAMES, 32)
        decoded = _decode(clip["path"])
        assert len(decoded) == FRAMES
        for got, want in zip(decoded, expected):
            assert np.abs(got.astype(int) - np.asarray(want).astype(int)).mean() < 8


def test_video_prediction(clips, tmp_path, ray_local):
    cfg = VideoPredictionConfig(input=str(clips["root"]), k=3, stride=2, predict=1, windows_per_clip=2, shard_size=3)
    report = run_ingest(VideoPredictionAdapter(cfg), tmp_path / "ds", workers=2, progress=False)
    n_good = len(clips["mp4"]) + len(clips["mkv"]) + len(clips["folders"])
    # Window 0 = frames 0,2,4 -> 6; window 1 = 8,10,12 -> 14: both fit in 16 frames.
    assert report.samples == 2 * n_good
    assert report.kinds == {"video": 2 * n_good}
    assert report.quarantined == dict(Counter(BAD_CLIP_CASES))
    ds = Dataset(tmp_path / "ds")
    assert sorted(q["origin"]["uri"] for q in ds.quarantine()) == sorted(p.name for p in clips["bad"])

    templates = load_templates()
    by_clip: dict[str, list] = {}
    for s in ds:
        rec = s.record
        user, assistant = rec["messages"]
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert user["content"][:3] == [{"image": 0}, {"image": 1}, {"image": 2}]  # inputs
        assert user["content"][3]["text"] == templates.user("video_prediction", rec["key"], 0)
        assert user["content"][3]["text"] in templates.groups["video_prediction"].user
        assert assistant["content"] == [{"text": "Here is what happens next:"}, {"image": 3}]  # target
        by_clip.setdefault(rec["origin"]["uri"], []).append((rec, s.images))
    # Keys are clip * windows_per_clip + window: ids say which clip and window a sample is.
    assert sorted(s.record["id"] for s in ds) == [f"video:{i:09d}" for i in range(2 * n_good)]

    for clip in clips["mp4"] + clips["mkv"]:
        decoded = _decode(clip["path"])
        (rec0, imgs0), (rec1, imgs1) = by_clip[Path(clip["path"]).name]
        assert (rec0["origin"]["input_frames"], rec0["origin"]["target_frames"]) == ([0, 2, 4], [6])
        assert (rec1["origin"]["input_frames"], rec1["origin"]["target_frames"]) == ([8, 10, 12], [14])
        for rec, imgs in ((rec0, imgs0), (rec1, imgs1)):
            numbers = rec["origin"]["input_frames"] + rec["origin"]["target_frames"]
            for data, f in zip(imgs, numbers):  # the target is exactly the decoded next frame
                assert np.array_equal(_pixels(data), decoded[f])
    for clip in clips["folders"]:  # frame folders: images kept byte for byte
        (rec0, imgs0), _ = by_clip[Path(clip["path"]).name]
        assert imgs0[3] == (Path(clip["path"]) / "000006.png").read_bytes()


def test_video_prediction_too_short_for_second_window(clips, tmp_path, ray_local):
    cfg = VideoPredictionConfig(input=str(clips["root"]), k=4, stride=3, predict=2, windows_per_clip=3)
    report = run_ingest(VideoPredictionAdapter(cfg), tmp_path / "ds", workers=1, progress=False)
    # Window 0 needs frames 0..15 (stride 3: 0,3,6,9 -> 12,15); window 1 would start at 18.
    assert report.samples == 7
    # The folder with a corrupt frame 2 has only 12 frames: too short before any frame is checked.
    assert report.quarantined == {"unreadable_video": 1, "too_few_frames": 3}


def test_video_qa(clips, tmp_path, ray_local):
    root = clips["root"]
    good = clips["mp4"] + clips["mkv"] + clips["folders"]
    path = write_videoqa_records(tmp_path, good, root)
    lines = path.read_text().splitlines()
    conv = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a shape"}]
    bad = [
        {"id": "b0", "video": "nope.mp4", "conversations": conv},  # missing_video
        {"id": "b1", "video": clips["bad"][0].name, "conversations": conv},  # unreadable_video
        {"id": "b2", "video": clips["bad"][1].name, "conversations": conv},  # too_few_frames (2 < 4)
        {
            "id": "b3",
            "video": "clip-0000.mp4",
            "conversations": [{"from": "human", "value": "<video> and <video>?"}, conv[1]],
        },  # placeholder_mismatch
        {"id": "b4", "video": "../outside.mp4", "conversations": conv},  # path_escape
        {"id": "b5", "conversations": conv},  # missing_field
    ]
    no_placeholder = {
        "id": "np",
        "video": "clip-0001.mp4",
        "conversations": [{"from": "human", "value": "Which way?"}, {"from": "gpt", "value": "up"}],
    }
    lines += [json.dumps(b) for b in bad] + [json.dumps(no_placeholder)]
    path.write_text("\n".join(lines) + "\n")

    cfg = VideoQAConfig(input=str(path), video_root=str(root), frames=4, shard_size=4)
    report = run_ingest(VideoQAAdapter(cfg), tmp_path / "ds", workers=2, progress=False)
    assert report.samples == len(good) + 1
    assert report.kinds == {"understanding": len(good) + 1}
    assert report.quarantined == {
        "missing_video": 1,
        "unreadable_video": 1,
        "too_few_frames": 1,
        "placeholder_mismatch": 1,
        "path_escape": 1,
        "missing_field": 1,
    }

    ds = Dataset(tmp_path / "ds")
    samples = list(ds)
    for s, clip in zip(samples, good):
        rec = s.record
        assert rec["origin"]["frames"] == [2, 6, 10, 14]  # centres of 4 equal segments of 16 frames
        user, assistant = rec["messages"]
        assert user == {
            "role": "user",
            "content": [{"image": i} for i in range(4)]
            + [{"text": f"Which way does the {clip['color']} {clip['shape']} move?"}],
        }
        assert assistant == {"role": "assistant", "content": [{"text": clip["direction"]}]}  # no targets
        if Path(clip["path"]).is_dir():
            assert s.images[1] == (Path(clip["path"]) / "000006.png").read_bytes()
        else:
            assert np.array_equal(_pixels(s.images[1]), _decode(clip["path"])[6])
    last = samples[-1].record
    assert last["origin"]["record_id"] == "np"
    assert last["messages"][0]["content"] == [{"image": i} for i in range(4)] + [{"text": "Which way?"}]
