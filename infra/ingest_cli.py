"""`vpit ingest pairs | video | editing`: argument parsers and runners, kept out of infra/cli.py
so that the shared entry point stays a thin table. Each builds one adapter config and runs
the same Ray ingest job as `vpit ingest llava`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

__all__ = ["add_parsers", "run"]

KINDS = ("pairs", "video", "editing")
_TEMPLATES_HELP = "prompt templates YAML (default: the built-in pipelines/templates/generation.yaml)"


def _common(p: argparse.ArgumentParser, source: str, shard_size: int, unit: str) -> None:
    p.add_argument("--output", "-o", required=True, help="dataset folder to write (or resume)")
    p.add_argument("--source", default=source, help=f"source name, the prefix of sample ids (default: {source})")
    p.add_argument("--shard-size", type=int, default=shard_size, help=f"{unit} per shard (default: {shard_size})")
    p.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024, help="quarantine images with more pixels (default: 64Mi)")


def add_parsers(sub, add_ray: Callable[[argparse.ArgumentParser], None]) -> None:
    pairs = sub.add_parser(
        "pairs", help="image-text URL list (MetaCLIP-style) -> generation samples, downloaded with img2dataset",
        description="Download a URL list with img2dataset (webdataset output and its stats kept under "
        "OUTPUT/img2dataset) and turn each pair into a generation sample: user 'Generate an image of {caption}' "
        "(a seeded template variant), assistant 'Here is an image based on your request:' + the image as target. "
        "Failed downloads go to quarantine with img2dataset's error message; images whose X-Robots-Tag opts "
        "out of AI use are skipped unless --allow-opted-out. INPUT may also be an existing img2dataset "
        "webdataset output folder. A killed run resumes (download and conversion) when re-run.")
    pairs.add_argument("input", help="URL list (.parquet/.csv/.tsv/.jsonl) or an img2dataset output folder")
    _common(pairs, "pairs", 1000, "URLs")
    pairs.add_argument("--url-col", default="url", help="URL column (default: url)")
    pairs.add_argument("--caption-col", default="caption", help="caption column (default: caption)")
    pairs.add_argument("--download-dir", default="", help="img2dataset output folder (default: OUTPUT/img2dataset)")
    pairs.add_argument("--image-size", type=int, default=0,
                       help="resize to fit this size and re-encode as JPEG (default: 0 = keep bytes as served)")
    pairs.add_argument("--allow-opted-out", action="store_true",
                       help="also keep images whose X-Robots-Tag says noai/noimageai/noindex/noimageindex")
    pairs.add_argument("--processes", type=int, default=1, help="img2dataset processes (default: 1)")
    pairs.add_argument("--threads", type=int, default=32, help="img2dataset threads per process (default: 32)")
    pairs.add_argument("--url-timeout", type=int, default=10, help="seconds per URL (default: 10)")
    pairs.add_argument("--retries", type=int, default=0, help="download retries per URL (default: 0)")
    pairs.add_argument("--job-timeout", type=float, default=3600.0,
                       help="kill the download after this many seconds; a re-run resumes (default: 3600)")
    pairs.add_argument("--templates", default="", help=_TEMPLATES_HELP)
    pairs.add_argument("--template-seed", type=int, default=0, help="seed of the per-sample template choice (default: 0)")
    add_ray(pairs)

    video = sub.add_parser(
        "video", help="video files or frame folders -> video-prediction samples, or video QA records",
        description="--task predict (default): INPUT is a folder of clips (video files decoded with PyAV, or "
        "sub-folders of frame images); each sample shows k frames STRIDE apart and asks what happens next, and "
        "the assistant predicts the next PREDICT frame(s) as image targets. --task qa: INPUT is a JSON/JSONL file "
        "of LLaVA records with a `video` field (relative to --video-root); FRAMES frames are sampled uniformly "
        "and become the input images of an understanding sample. Unreadable clips and clips with too few "
        "frames go to quarantine.")
    video.add_argument("input", help="folder of clips (predict) or LLaVA-format records with `video` (qa)")
    video.add_argument("--task", choices=("predict", "qa"), default="predict", help="sample kind (default: predict)")
    _common(video, "video", 100, "clips (predict) or records (qa)")
    video.add_argument("--k", type=int, default=4, help="predict: input frames per sample (default: 4)")
    video.add_argument("--predict", type=int, default=1, help="predict: target frames per sample (default: 1)")
    video.add_argument("--stride", type=int, default=1, help="predict: frames between sampled frames (default: 1)")
    video.add_argument("--windows-per-clip", type=int, default=1,
                       help="predict: most non-overlapping samples per clip (default: 1)")
    video.add_argument("--video-root", default=None, help="qa: folder that `video` paths are relative to")
    video.add_argument("--frames", type=int, default=8, help="qa: frames sampled per clip (default: 8)")
    video.add_argument("--frame-format", choices=("png", "jpeg"), default="png",
                       help="how decoded frames are stored (default: png, lossless)")
    video.add_argument("--templates", default="", help=_TEMPLATES_HELP)
    video.add_argument("--template-seed", type=int, default=0, help="seed of the per-sample template choice (default: 0)")
    add_ray(video)

    editing = sub.add_parser(
        "editing", help="(source, instruction, target) triplets -> editing samples",
        description="Ingest image-editing triplets from JSONL or parquet: user = source image + instruction, "
        "assistant = 'Here is the edited image:' + target image as prediction target. Images may be paths or "
        "inline bytes ({bytes, path} structs as in the InstructPix2Pix and MagicBrush datasets; base64 in JSONL). "
        "Missing images and targets identical to their source go to quarantine.")
    editing.add_argument("input", help="JSONL or parquet file of triplets")
    _common(editing, "editing", 1000, "rows")
    editing.add_argument("--image-root", default="", help="folder that image paths are relative to (default: the input's folder)")
    editing.add_argument("--layout", choices=("auto", "generic", "instructpix2pix", "magicbrush"), default="auto",
                         help="field names: generic (source, instruction, target), instructpix2pix (original_image, "
                         "edit_prompt, edited_image), magicbrush (source_img, instruction, target_img); default: auto")
    editing.add_argument("--templates", default="", help=_TEMPLATES_HELP)
    editing.add_argument("--template-seed", type=int, default=0, help="seed of the per-sample template choice (default: 0)")
    add_ray(editing)


def _abs(path: str) -> str:
    return os.path.abspath(path) if path else ""


def run(args: argparse.Namespace):
    """Run `vpit ingest KIND` for one of KINDS; return the IngestReport."""
    from pipelines.ingest import IngestError, run_ingest

    kind = args.source_kind
    common = dict(source=args.source, shard_size=args.shard_size, max_pixels=args.max_pixels)
    templates = dict(templates=_abs(args.templates), template_seed=args.template_seed)
    if kind == "pairs":
        from pipelines.pairs import PairsConfig, ingest_pairs

        cfg = PairsConfig(
            input=_abs(args.input), download_dir=_abs(args.download_dir), url_col=args.url_col,
            caption_col=args.caption_col, image_size=args.image_size, respect_opt_out=not args.allow_opted_out,
            processes=args.processes, threads=args.threads, url_timeout_s=args.url_timeout, retries=args.retries,
            job_timeout_s=args.job_timeout, **common, **templates)
        report, stats = ingest_pairs(cfg, args.output, workers=args.workers, ray_address=args.ray_address)
        errors = "".join(f"\n  {n:>6}  {msg}" for msg, n in stats["errors"].items())
        print(f"img2dataset  {stats['count']} URLs in {stats['shards']} shards: {stats['successes']} downloaded, "
              f"{stats['failed_to_download']} failed to download, {stats['failed_to_resize']} failed to resize"
              + (f"; top errors:{errors}" if errors else ""))
        return report
    if kind == "video" and args.task == "predict":
        from pipelines.video import VideoPredictionAdapter, VideoPredictionConfig

        adapter = VideoPredictionAdapter(VideoPredictionConfig(
            input=_abs(args.input), k=args.k, predict=args.predict, stride=args.stride,
            windows_per_clip=args.windows_per_clip, frame_format=args.frame_format, **common, **templates))
    elif kind == "video":
        from pipelines.video import VideoQAAdapter, VideoQAConfig

        if not args.video_root:
            raise IngestError("--task qa needs --video-root (the folder that `video` paths are relative to)")
        adapter = VideoQAAdapter(VideoQAConfig(
            input=_abs(args.input), video_root=_abs(args.video_root), frames=args.frames,
            frame_format=args.frame_format, **dict(common, source=args.source if args.source != "video" else "videoqa")))
    else:
        from pipelines.editing import EditingAdapter, EditingConfig

        adapter = EditingAdapter(EditingConfig(
            input=_abs(args.input), image_root=_abs(args.image_root), layout=args.layout, **common, **templates))
    return run_ingest(adapter, args.output, workers=args.workers, ray_address=args.ray_address)
