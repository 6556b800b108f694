"""`vpit demo`: the whole pipeline, as far as it exists, on generated shapes-world data.

Stages so far: 1. generate raw LLaVA-format data (with a few bad records on purpose),
2. ingest it with Ray. Each later stage appends itself here.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipelines.ingest import run_ingest
from pipelines.inspect import render_sample
from pipelines.llava import LlavaAdapter, LlavaConfig
from pipelines.shapes_world import write_bad_llava_records, write_llava_dataset
from pipelines.shards import Dataset

__all__ = ["run_demo"]


def _stage(n: int, title: str) -> None:
    print(f"\n[{n}] {title}", flush=True)


def _precompute_stage(dataset: Path, workers: int) -> str:
    """Encode every image once with the tiny SigLIP; returns the cache fingerprint."""
    from model.encoder import EncoderConfig
    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.token_cache import TokenCache

    _stage(3, f"precompute visual tokens of {dataset.name} with the tiny SigLIP (Ray actor pool)")
    report = run_precompute(dataset, EncoderConfig(encoder="tiny"), PrecomputeConfig(actors=max(1, workers // 2)))
    print(report.summary())
    cache = TokenCache(dataset, report.fingerprint)
    print(f"    sample 0 of shard 0: tokens {cache.tokens(0, 0).shape} (images, m, d), float32 from {cache.info['dtype']}")
    return report.fingerprint


def run_demo(output: str | Path, samples: int = 400, workers: int = 2) -> dict:
    t0 = time.perf_counter()
    out = Path(output)
    raw = out / "raw" / "llava"
    _stage(1, f"generate {samples} shapes-world LLaVA records plus one bad record per quarantine reason")
    info = write_llava_dataset(raw, samples, seed=0)
    bad = write_bad_llava_records(raw, bomb_side=2100)
    with open(info["jsonl"], "ab") as f:
        f.write(b"\n".join(bad) + b"\n")
    print(f"    wrote {info['jsonl']} and {len(list((raw / 'images').iterdir()))} images")

    _stage(2, "ingest with Ray Data -> WebDataset shards")
    adapter = LlavaAdapter(LlavaConfig(input=str(info["jsonl"]), image_root=str(raw), source="shapes",
                                       shard_size=100, max_pixels=4_000_000))
    report = run_ingest(adapter, out / "datasets" / "understanding", workers=workers)
    print(report.summary())
    ds = Dataset(out / "datasets" / "understanding")
    print("\n    first sample:\n" + render_sample(ds.read(0, 0).record))

    _precompute_stage(out / "datasets" / "understanding", workers)

    from infra.demo_sources import ingest_other_sources

    _stage(4, "generate and ingest the other source kinds: image-text pairs, video, editing")
    ingest_other_sources(out, workers=workers)

    from mixtures.demo import mixture_stage

    _stage(5, "plan the demo mixture (exact counts per source, per-batch group ratios)")
    mixture_stage(out)

    from train.demo import train_stage

    _stage(6, "train a tiny VPiT model on the demo mixture (DeepSpeed ZeRO-3, CPU), export it, generate")
    train_stage(out)

    from train.decoder_demo import decoder_stage

    _stage(7, "train the diffusion decoder (visual tokens -> pixels) on the token cache; decode generated tokens")
    decoder_stage(out)

    summary = {"samples": report.samples, "quarantined": report.quarantined, "seconds": time.perf_counter() - t0}
    print(f"\ndemo finished in {summary['seconds']:.0f}s; outputs under {out}/")
    return summary
