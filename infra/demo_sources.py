"""Demo stage: generate and ingest the other source kinds (pairs, video, editing) on shapes-world data.

Pairs are served by a localhost http.server that starts and stops here and are downloaded with
real img2dataset; clips of a moving shape are written with PyAV; edits are recolours and
moves. Each input carries its bad cases, so the quarantine counts show in every summary.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.editing import EditingAdapter, EditingConfig
from pipelines.ingest import run_ingest
from pipelines.inspect import render_sample
from pipelines.pairs import PairsConfig, ingest_pairs
from pipelines.shapes_world import (
    serve_http, write_bad_clips, write_clips, write_edit_triplets, write_pairs, write_videoqa_records,
)
from pipelines.shards import Dataset
from pipelines.video import VideoPredictionAdapter, VideoPredictionConfig, VideoQAAdapter, VideoQAConfig

__all__ = ["ingest_other_sources"]


def _show(path: Path) -> None:
    print("    first sample:\n" + "\n".join("    " + line for line in render_sample(Dataset(path).read(0, 0).record).splitlines()))


def ingest_other_sources(out: Path, workers: int = 2, pairs: int = 40, clips: int = 12, edits: int = 40) -> dict[str, Path]:
    """Generate and ingest pairs, video (prediction and QA) and editing data; return the dataset folders."""
    raw, datasets = out / "raw", out / "datasets"
    found: dict[str, Path] = {}

    print(f"    pairs: {pairs} captioned images + 5 bad URLs on a localhost http.server, downloaded by img2dataset")
    (raw / "pairs" / "www").mkdir(parents=True, exist_ok=True)
    with serve_http(raw / "pairs" / "www") as base:
        info = write_pairs(raw / "pairs", pairs, base, seed=0)
        report, stats = ingest_pairs(PairsConfig(input=str(info["url_list"]), shard_size=20, threads=8),
                                     datasets / "generation", workers=workers)
    print(f"    img2dataset: {stats['successes']}/{stats['count']} downloaded; errors {stats['errors']}")
    print(report.summary())
    _show(datasets / "generation")
    found["generation"] = datasets / "generation"

    print(f"\n    video: {clips} clips of a moving shape (PyAV, H.264) + 4 bad clips")
    clip_info = write_clips(raw / "clips", clips, seed=0, frames=16)
    write_bad_clips(raw / "clips")
    report = run_ingest(VideoPredictionAdapter(VideoPredictionConfig(
        input=str(raw / "clips"), k=3, stride=2, windows_per_clip=2, shard_size=8)), datasets / "video", workers=workers)
    print(report.summary())
    _show(datasets / "video")
    found["video"] = datasets / "video"

    print("\n    video QA: one 'which way does it move?' record per clip, 4 frames sampled uniformly")
    qa = write_videoqa_records(raw / "clips", clip_info, raw / "clips")
    report = run_ingest(VideoQAAdapter(VideoQAConfig(input=str(qa), video_root=str(raw / "clips"), frames=4)),
                        datasets / "videoqa", workers=workers)
    print(report.summary())
    found["videoqa"] = datasets / "videoqa"

    print(f"\n    editing: {edits} recolour/move triplets (MagicBrush layout, inline bytes in parquet) + 3 bad")
    edit_info = write_edit_triplets(raw / "edits", edits, seed=0, layout="magicbrush", fmt="parquet")
    report = run_ingest(EditingAdapter(EditingConfig(input=str(edit_info["path"]), shard_size=20)),
                        datasets / "editing", workers=workers)
    print(report.summary())
    _show(datasets / "editing")
    found["editing"] = datasets / "editing"
    return found
