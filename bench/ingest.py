"""Ingest throughput: the Ray job at 1 and 2 workers, against a plain single-process loop.

    python bench/ingest.py [--samples 5000]

All three do the same conversion (validate, decode every image, write the same shards);
the plain loop calls the same per-shard function with no Ray at all, so the ratios show
what Ray costs and what parallelism buys on this machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from vpit.demo.corpora import write_llava_dataset
from vpit.pipelines.ingest import ingest_shard, init_ray, run_ingest
from vpit.pipelines.llava import LlavaAdapter, LlavaConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vpit-bench-ingest-"))
    try:
        info = write_llava_dataset(tmp / "raw", args.samples, seed=0, size=128)
        cfg = LlavaConfig(
            input=str(info["jsonl"]), image_root=str(tmp / "raw"), source="bench", shard_size=args.shard_size
        )
        adapter = LlavaAdapter(cfg)
        init_ray(None)  # start Ray before timing: a cluster is up before a real job starts

        t = time.perf_counter()
        for i, task in enumerate(adapter.plan()):
            ingest_shard(adapter, tmp / "plain", i, task)
        plain = args.samples / (time.perf_counter() - t)

        rates = {}
        for workers in (1, 2):
            t = time.perf_counter()
            run_ingest(adapter, tmp / f"ray{workers}", workers=workers, progress=False)
            rates[workers] = args.samples / (time.perf_counter() - t)

        print(f"samples               {args.samples} ({args.shard_size} per shard, 128px images)")
        print(f"plain loop, 1 process {plain:8.0f} samples/s")
        print(f"ray ingest, 1 worker  {rates[1]:8.0f} samples/s   {rates[1] / plain:.2f}x plain")
        print(
            f"ray ingest, 2 workers {rates[2]:8.0f} samples/s   {rates[2] / plain:.2f}x plain, "
            f"{rates[2] / rates[1]:.2f}x 1 worker"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
