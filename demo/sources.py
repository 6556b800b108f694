"""Demo stages 1 and 2: write raw shapes-world corpora of all four kinds, then ingest them.

Stage 1 writes each kind in the raw format a user would bring: LLaVA JSONL + image files
(understanding), a parquet URL list served by a localhost http.server (generation pairs, for
real img2dataset), H.264 clips and a video-QA JSONL (video), a MagicBrush-style parquet of
inline image bytes (editing). Each input carries bad cases on purpose, so the quarantine
counts show in the summaries and the report. Stage 2 ingests each into a dataset folder.
The http.server must stay up between the two stages: it is "the web" the pairs live on.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vpit.demo.corpora import (
    write_bad_clips,
    write_bad_llava_records,
    write_clips,
    write_edit_triplets,
    write_llava_dataset,
    write_pairs,
    write_videoqa_records,
)
from vpit.pipelines.editing import EditingAdapter, EditingConfig
from vpit.pipelines.ingest import IngestReport, run_ingest
from vpit.pipelines.inspect import render_sample
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.pairs import PairsConfig, ingest_pairs
from vpit.pipelines.shards import Dataset
from vpit.pipelines.video import VideoPredictionAdapter, VideoPredictionConfig, VideoQAAdapter, VideoQAConfig

__all__ = ["RawSources", "generate_raw", "ingest_raw"]


@dataclasses.dataclass(frozen=True)
class RawSources:
    """Where stage 1 put each raw input (stage 2's inputs)."""

    llava_jsonl: Path
    llava_root: Path
    pairs_urls: Path
    clips: Path
    videoqa_jsonl: Path
    edits: Path
    counts: dict[str, str]
    """Kind -> what was written, for the report."""


def generate_raw(
    out: Path, *, samples: int, pairs: int, clips: int, edits: int, base_url: str, progress: bool = True
) -> RawSources:
    """Write every raw input under OUT/raw; pairs' URLs point at `base_url`, which serves OUT/raw/pairs/www."""
    from tqdm import tqdm

    raw = Path(out) / "raw"
    bar = tqdm(total=5, desc="generate raw", unit="kind", disable=not progress)
    info = write_llava_dataset(raw / "llava", samples, seed=0)
    bad = write_bad_llava_records(raw / "llava", bomb_side=2100)
    with open(info["jsonl"], "ab") as f:  # bad records at the end, so the good ones keep their lines
        f.write(b"\n".join(bad) + b"\n")
    bar.update(1)
    # seed 1: other scenes than the LLaVA ones; PNG: the model learns to draw from these targets, and
    # JPEG's ringing would be part of what it learns (the LLaVA inputs mix both formats)
    pair_info = write_pairs(raw / "pairs", pairs, base_url, seed=1, image_formats=("PNG",))
    bar.update(1)
    clip_info = write_clips(raw / "clips", clips, seed=0, frames=16)
    write_bad_clips(raw / "clips")
    bar.update(1)
    qa = write_videoqa_records(raw / "clips", clip_info, raw / "clips")
    bar.update(1)
    edit_info = write_edit_triplets(raw / "edits", edits, seed=0, layout="magicbrush", fmt="parquet")
    bar.update(1)
    bar.close()
    counts = {
        "understanding": f"{samples} LLaVA records + {len(bad)} bad ones (data.jsonl, images/)",
        "generation": f"{pairs} captioned images + 5 bad URLs ({pair_info['url_list'].name} on {base_url})",
        "video": f"{clips} H.264 clips + 4 bad ones, and a video-QA JSONL over them",
        "editing": f"{edits} recolour/move triplets + 3 bad ({edit_info['path'].name}, MagicBrush layout)",
    }
    for kind, text in counts.items():
        print(f"    {kind:<14} {text}")
    return RawSources(
        llava_jsonl=Path(info["jsonl"]),
        llava_root=raw / "llava",
        pairs_urls=Path(pair_info["url_list"]),
        clips=raw / "clips",
        videoqa_jsonl=Path(qa),
        edits=Path(edit_info["path"]),
        counts=counts,
    )


def _show(path: Path) -> None:
    first = render_sample(Dataset(path).read(0, 0).record)
    print("    first sample:\n" + "\n".join("    " + line for line in first.splitlines()))


def ingest_raw(out: Path, raw: RawSources, workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Ingest every raw input into OUT/datasets/<name>; return name -> report facts (for the report)."""
    datasets = Path(out) / "datasets"
    reports: dict[str, IngestReport] = {}
    extra: dict[str, str] = {}

    print("    understanding: LLaVA JSONL -> WebDataset shards (Ray Data)")
    reports["understanding"] = run_ingest(
        LlavaAdapter(
            LlavaConfig(
                input=str(raw.llava_jsonl),
                image_root=str(raw.llava_root),
                source="shapes",
                shard_size=100,
                max_pixels=4_000_000,
            )
        ),
        datasets / "understanding",
        workers=workers,
    )

    print("    generation: the URL list, downloaded by img2dataset from the localhost server")
    reports["generation"], stats = ingest_pairs(
        PairsConfig(input=str(raw.pairs_urls), shard_size=200, threads=32), datasets / "generation", workers=workers
    )
    extra["generation"] = f"img2dataset: {stats['successes']}/{stats['count']} downloaded"

    print("    video: next-frame prediction windows from the clips")
    reports["video"] = run_ingest(
        VideoPredictionAdapter(
            VideoPredictionConfig(input=str(raw.clips), k=3, stride=2, windows_per_clip=2, shard_size=8)
        ),
        datasets / "video",
        workers=workers,
    )

    print("    videoqa: 'which way does it move?', 4 frames sampled uniformly per clip")
    reports["videoqa"] = run_ingest(
        VideoQAAdapter(VideoQAConfig(input=str(raw.videoqa_jsonl), video_root=str(raw.clips), frames=4)),
        datasets / "videoqa",
        workers=workers,
    )

    print("    editing: source image + instruction -> target image")
    reports["editing"] = run_ingest(
        EditingAdapter(EditingConfig(input=str(raw.edits), shard_size=20)), datasets / "editing", workers=workers
    )

    facts = {}
    for name, rep in reports.items():
        print()
        print("\n".join("    " + line for line in rep.summary().splitlines()))
        if name in extra:
            print("    " + extra[name])
        if name != "videoqa":
            _show(rep.output)
        facts[name] = {
            "path": str(rep.output),
            "samples": rep.samples,
            "kinds": dict(rep.kinds),
            "quarantined": dict(rep.quarantined),
            "note": extra.get(name, ""),
        }
    return facts
