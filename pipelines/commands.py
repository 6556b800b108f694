"""`vpit ingest llava|pairs|video|videoqa|editing`, `vpit precompute`, `vpit inspect`.

Each command is its config dataclasses plus a function; `vpit.cli` makes the flags.
"""

from __future__ import annotations

import dataclasses

from vpit.config import Command, Group, path_field
from vpit.model.encoder import EncoderConfig
from vpit.pipelines.dedup import DedupConfig
from vpit.pipelines.editing import EditingAdapter, EditingConfig
from vpit.pipelines.ingest import IngestJob, IngestReport, run_ingest
from vpit.pipelines.inspect import InspectConfig, describe_dataset
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
from vpit.pipelines.pairs import PairsConfig, ingest_pairs
from vpit.pipelines.precompute import PrecomputeConfig, run_precompute
from vpit.pipelines.verify import VerifyConfig
from vpit.pipelines.video import VideoPredictionAdapter, VideoPredictionConfig, VideoQAAdapter, VideoQAConfig

__all__ = ["dedup", "ingest", "inspect", "precompute", "verify"]


def _report(report: IngestReport) -> None:
    if report.shards_written == 0:
        print(f"nothing to do: all {report.shards_total} shards of {report.output} are already complete")
    print(report.summary())


def _card(job: IngestJob) -> dict[str, str | None] | None:
    """The card's licence and citation when given (a re-run without them keeps the card)."""
    return {"license": job.license, "citation": job.citation} if job.license or job.citation else None


def _adapter_command(adapter_cls, config_cls, summary: str, description: str) -> Command:
    def run(config, job: IngestJob) -> None:
        _report(
            run_ingest(
                adapter_cls(config), job.output, workers=job.workers, ray_address=job.ray_address, card=_card(job)
            )
        )

    return Command(
        summary=summary,
        description=description,
        run=run,
        configs=(config_cls, IngestJob),
        positional=("input",),
        short={"output": "-o"},
    )


def _ingest_pairs(config: PairsConfig, job: IngestJob) -> None:
    if config.estimate_attrition:
        import tempfile
        from pathlib import Path

        from vpit.pipelines.pairs import estimate_attrition

        with tempfile.TemporaryDirectory(prefix="vpit-attrition-") as work:
            e = estimate_attrition(config, Path(work))
        lo, hi = e["interval"]
        errors = "".join(f"\n  {n:>6}  {msg}" for msg, n in e["errors"].items())
        print(
            f"attrition  {e['arrived']} of {e['sampled']} sampled URLs arrived ({e['rate']:.1%}, 95% interval "
            f"{lo:.1%}-{hi:.1%})\npredicted  {e['predicted']:,} of {e['urls']:,} URLs will arrive "
            f"({e['predicted_interval'][0]:,}-{e['predicted_interval'][1]:,}); size mixture counts on that, "
            "not on the URL count" + (f"\nwhy the rest fail:{errors}" if errors else "")
        )
        return
    report, stats = ingest_pairs(config, job.output, workers=job.workers, ray_address=job.ray_address, card=_card(job))
    errors = "".join(f"\n  {n:>6}  {msg}" for msg, n in stats["errors"].items())
    print(
        f"img2dataset  {stats['count']} URLs in {stats['shards']} shards: {stats['successes']} downloaded, "
        f"{stats['failed_to_download']} failed to download, {stats['failed_to_resize']} failed to resize"
        + (f"; top errors:{errors}" if errors else "")
    )
    _report(report)


ingest = Group(
    summary="raw source -> instruction shards (Ray Data job)",
    description="Ingest a raw source into WebDataset shards with an index and a manifest. Bad records go to "
    "quarantine.jsonl with a reason; a re-run resumes, skipping complete shards.",
    commands={
        "llava": _adapter_command(
            LlavaAdapter,
            LlavaConfig,
            "LLaVA/Cambrian-format JSON or JSONL -> understanding samples",
            "Ingest LLaVA/Cambrian-format records (JSON list or JSONL with id, image, conversations).",
        ),
        "pairs": Command(
            summary="image-text URL list (MetaCLIP-style) -> generation samples, downloaded with img2dataset",
            description="Download a URL list with img2dataset (webdataset output and its stats kept under "
            "OUTPUT/img2dataset) and turn each pair into a generation sample: user 'Generate an image of {caption}' "
            "(a seeded template variant), assistant 'Here is an image based on your request:' + the image as target. "
            "Failed downloads go to quarantine with img2dataset's error message; images whose X-Robots-Tag opts "
            "out of AI use are skipped unless --no-respect-opt-out. INPUT may also be an existing img2dataset "
            "webdataset output folder. A killed run resumes (download and conversion) when re-run.",
            run=_ingest_pairs,
            configs=(PairsConfig, IngestJob),
            positional=("input",),
            short={"output": "-o"},
        ),
        "video": _adapter_command(
            VideoPredictionAdapter,
            VideoPredictionConfig,
            "video files or frame folders -> video-prediction samples",
            "INPUT is a folder of clips (video files decoded with PyAV, or sub-folders of frame images); each "
            "sample shows k frames STRIDE apart and the assistant predicts the next PREDICT frame(s) as image "
            "targets. Unreadable clips and clips with too few frames go to quarantine.",
        ),
        "videoqa": _adapter_command(
            VideoQAAdapter,
            VideoQAConfig,
            "LLaVA records with a `video` field -> video-QA understanding samples",
            "INPUT is a JSON/JSONL file of LLaVA records with a `video` field (relative to --video-root); FRAMES "
            "frames are sampled uniformly and become the input images of an understanding sample.",
        ),
        "editing": _adapter_command(
            EditingAdapter,
            EditingConfig,
            "(source, instruction, target) triplets -> editing samples",
            "Ingest image-editing triplets from JSONL or parquet: user = source image + instruction, assistant = "
            "'Here is the edited image:' + target image as prediction target. Images may be paths or inline bytes "
            "({bytes, path} structs as in the InstructPix2Pix and MagicBrush datasets; base64 in JSONL).",
        ),
    },
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class PrecomputeJob:
    """Which dataset and which cluster; nothing here changes the tokens."""

    dataset: str = path_field()
    """Dataset folder (holds manifest.json)."""
    ray_address: str | None = None
    """Ray cluster to join (ray://head:10001, auto); default: RAY_ADDRESS, else a local Ray."""


def _precompute(encoder: EncoderConfig, config: PrecomputeConfig, job: PrecomputeJob) -> None:
    report = run_precompute(job.dataset, encoder, config, ray_address=job.ray_address)
    if report.shards_written == 0:
        print(f"nothing to do: all {report.shards_total} shards of {report.dataset} are already cached")
    print(report.summary())


precompute = Command(
    summary="images -> cached frozen-encoder visual tokens (Ray job)",
    description="Encode every image of DATASET once with a frozen vision encoder and store its visual tokens in "
    "DATASET/tokens/<fingerprint>/ (one memory-mappable .npy per shard, aligned with the shard index). The "
    "fingerprint hashes every setting that changes the numbers, so caches of several encoders live side by side. "
    "Runs as a Ray Data job with one encoder per actor (one actor per GPU on a GPU cluster); a re-run skips "
    "complete shards and redoes partial or stale ones.",
    run=_precompute,
    configs=(EncoderConfig, PrecomputeConfig, PrecomputeJob),
    positional=("dataset",),
)

inspect = Command(
    summary="print a dataset's manifest summary and render samples",
    run=lambda cfg: print(describe_dataset(cfg.path, n=cfg.n, quarantine=cfg.quarantine)),
    configs=(InspectConfig,),
    positional=("path",),
)


def _verify(cfg) -> None:
    from pathlib import Path

    from vpit.pipelines.verify import DatasetDamaged, format_report, verify_dataset

    problems, facts = verify_dataset(cfg.dataset, caches=cfg.caches)
    print(format_report(Path(cfg.dataset), problems, facts))
    bad_caches = [fp for fp, states in facts["caches"].items() if set(states) - {"ok"}]
    if problems or bad_caches:
        raise DatasetDamaged(
            f"{len(problems)} damaged shard(s), {len(bad_caches)} incomplete token cache(s) in {cfg.dataset}; "
            "see the lines above for where and how to fix"
        )
    print("ok        every shard matches its manifest entry and its index")


verify = Command(
    summary="check every shard against the manifest and its index against its tar",
    description="Check DATASET: each tar's size and sha256 against the manifest, the tar's own member headers "
    "against the JSON and binary indexes, every sample's JSON and image bytes against their record (which "
    "locates the first bad byte range of a damaged tar), and every token cache's shards. Prints what is wrong "
    "and how to fix it; exits 2 when anything is.",
    run=_verify,
    configs=(VerifyConfig,),
    positional=("dataset",),
)


def _dedup(cfg: DedupConfig) -> None:
    from vpit.pipelines.dedup import find_duplicates, format_dedup

    print(format_dedup(find_duplicates(cfg), cfg.near_distance))


dedup = Command(
    summary="exact and near duplicate images within and across datasets",
    description="Compare the images of DATASET... by sha256 (exact) and by difference hash (near: re-encoded or "
    "resized copies), from the shard indexes alone. Prints the images that have a copy, the copies that could "
    "go and their bytes, the groups that span datasets, and the largest groups with the samples that use them. "
    "A mixture can hold out every sample sharing an image with a held-out one: heldout: {fraction: F, near: true}.",
    run=_dedup,
    configs=(DedupConfig,),
    positional=("datasets",),
)
