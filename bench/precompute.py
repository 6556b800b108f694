"""Bench: the precompute job's images/s against a bare loop of the same forwards.

The baseline runs the same encoder (same weights, threads, batch size and chunking) on pixel
tensors that are already decoded and preprocessed, so it measures the forward plus pooling and
nothing else. The ratio (pipeline / bare) is the pipeline's efficiency: what Ray Data, decoding,
preprocessing, object transfer and cache writing cost on top of the model. Goal >= 0.85.

The encoder is a random SigLIP of ViT-S size (224px, patch 16, width 384, 6 layers) saved to a
folder and loaded by path, so the forward is a realistic share of the work; the tiny test
encoder would measure Ray's per-chunk overhead instead.

    python bench/precompute.py [--images 320] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bench_encoder(folder: Path) -> None:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vpit.model.encoder import tiny_processor

    vc = SiglipVisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
    )
    torch.manual_seed(0)
    SiglipVisionModel(vc).save_pretrained(folder)
    tiny_processor(224).save_pretrained(folder)


def _decoded_chunks(encoder, dataset: Path, batch_size: int) -> list:
    """Every image decoded and preprocessed, chunked exactly as the pipeline chunks them."""
    from vpit.model.encoder import decode_image
    from vpit.pipelines.precompute import plan_shard
    from vpit.pipelines.shards import Dataset

    chunks = []
    for shard in Dataset(dataset).shards:
        _, spans = plan_shard(dataset, shard["name"])
        with open(dataset / "shards" / f"{shard['name']}.tar", "rb") as f:
            images = []
            for off, size in spans:
                f.seek(off)
                images.append(decode_image(f.read(size)))
        chunks += [encoder.preprocess(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return chunks


def _bare_loop(config_dict: dict, chunks: list) -> tuple[float, int]:
    """Images/s of encode_pixels + the cast to fp16 on ready pixel tensors. It runs as a Ray
    task with the actor's CPU request and thread count, so both sides get the same process
    setup (Ray gives workers their own session, which the kernel schedules as its own group)."""
    import torch

    from vpit.model.encoder import EncoderConfig, load_encoder

    torch.set_num_threads(1)
    encoder = load_encoder(EncoderConfig(**config_dict))
    encoder.encode_pixels(chunks[0])  # warm-up, as the pipeline's first chunk is excluded too
    start = time.perf_counter()
    n = 0
    for pixels in chunks[1:]:
        encoder.encode_pixels(pixels).half().numpy()
        n += len(pixels)
    return n / (time.perf_counter() - start), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=240, help="shapes-world records to ingest (about 1 image each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "int8"))
    args = ap.parse_args()

    import ray

    from vpit.common import init_ray
    from vpit.demo.corpora import write_llava_dataset
    from vpit.model.encoder import EncoderConfig, load_encoder
    from vpit.pipelines.ingest import run_ingest
    from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    with tempfile.TemporaryDirectory(prefix="vpit-bench-precompute-") as tmp:
        tmp = Path(tmp)
        _bench_encoder(tmp / "encoder")
        info = write_llava_dataset(tmp / "raw", args.images, seed=0, size=256)
        adapter = LlavaAdapter(
            LlavaConfig(
                input=str(info["jsonl"]),
                image_root=str(tmp / "raw"),
                source="bench",
                shard_size=max(1, args.images // 4),
                max_pixels=4_000_000,
            )
        )
        init_ray(None)
        run_ingest(adapter, tmp / "ds", progress=False)
        cfg = EncoderConfig(encoder=str(tmp / "encoder"), dtype=args.dtype)

        chunks = ray.put(_decoded_chunks(load_encoder(cfg), tmp / "ds", args.batch_size))
        bare_task = ray.remote(num_cpus=1)(_bare_loop)
        bare_before, n = ray.get(bare_task.remote(dataclasses.asdict(cfg), chunks))
        report = run_precompute(
            tmp / "ds", cfg, PrecomputeConfig(batch_size=args.batch_size, actors=1, actor_cpus=1), progress=False
        )
        bare_after, _ = ray.get(bare_task.remote(dataclasses.asdict(cfg), chunks))
        bare = (bare_before + bare_after) / 2

        per_image = report.cache_bytes / report.images
        print(f"encoder      SigLIP 224px/16, width 384, 6 layers; m={report.m}, d={report.dim}, {report.dtype}")
        print(f"images       {report.images} (batch {args.batch_size}, 1 actor, 1 torch thread each side)")
        print(f"bare loop    {bare:.1f} images/s  (before {bare_before:.1f}, after {bare_after:.1f}; {n} images)")
        print(
            f"pipeline     {report.steady_images_per_s:.1f} images/s once the first chunk is out; "
            f"{report.images_per_s:.1f} images/s with actor start"
        )
        print(f"efficiency   {report.steady_images_per_s / bare:.2f}  (pipeline / bare loop; goal >= 0.85)")
        print(
            f"cache        {per_image:.0f} bytes per image ({report.m} x {report.dim} x 2 = "
            f"{report.m * report.dim * 2} payload + offsets, headers, markers)"
        )


if __name__ == "__main__":
    main()
