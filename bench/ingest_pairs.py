"""Pairs ingest throughput: `vpit ingest pairs` against bare img2dataset on the same URL list.

    python bench/ingest_pairs.py [--pairs 1000] [--threads 16] [--shard-size 250]

A localhost http.server serves generated images. Bare img2dataset (its own CLI, webdataset
output, same processes/threads/shard size, bytes kept as served) is the baseline; `vpit
ingest pairs` runs that same download and then converts, validates (full image decode)
and writes instruction shards with Ray. Ray is started before timing, as a cluster is up
before a real job starts. The conversion alone (an existing img2dataset folder as input)
is timed too, to show where the time goes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vpit.common import init_ray
from vpit.demo.corpora import serve_http, write_pairs
from vpit.pipelines.pairs import PairsConfig, ingest_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vpit-bench-pairs-"))
    try:
        (tmp / "www").mkdir()
        with serve_http(tmp / "www") as base:
            info = write_pairs(tmp, args.pairs, base, seed=0, size=128, bad=False)
            init_ray(None)

            t = time.perf_counter()
            subprocess.run(
                [
                    str(Path(sys.executable).with_name("img2dataset")),
                    "--url_list",
                    str(info["url_list"]),
                    "--output_folder",
                    str(tmp / "bare"),
                    "--output_format",
                    "webdataset",
                    "--input_format",
                    "parquet",
                    "--url_col",
                    "url",
                    "--caption_col",
                    "caption",
                    "--processes_count",
                    "1",
                    "--thread_count",
                    str(args.threads),
                    "--number_sample_per_shard",
                    str(args.shard_size),
                    "--disable_all_reencoding",
                    "True",
                    "--resize_mode",
                    "no",
                    "--extract_exif",
                    "False",
                    "--enable_wandb",
                    "False",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            bare_s = time.perf_counter() - t

            cfg = PairsConfig(input=str(info["url_list"]), shard_size=args.shard_size, threads=args.threads)
            t = time.perf_counter()
            report, stats = ingest_pairs(cfg, tmp / "vpit", workers=args.workers, progress=False)
            vpit_s = time.perf_counter() - t

        t = time.perf_counter()
        ingest_pairs(
            PairsConfig(input=str(tmp / "bare"), shard_size=args.shard_size),
            tmp / "convert",
            workers=args.workers,
            progress=False,
        )
        convert_s = time.perf_counter() - t

        n = report.samples
        assert n == args.pairs == stats["successes"], (n, stats)
        bare, vpit, convert = n / bare_s, n / vpit_s, n / convert_s
        print(
            f"pairs                    {n} (128px images, {args.shard_size} per shard, {args.threads} threads, "
            f"{args.workers} Ray workers)"
        )
        print(f"bare img2dataset         {bare:8.1f} samples/s  ({bare_s:.1f}s)")
        print(f"vpit ingest pairs        {vpit:8.1f} samples/s  ({vpit_s:.1f}s)   {vpit / bare:.2f}x bare img2dataset")
        print(f"  conversion alone       {convert:8.1f} samples/s  ({convert_s:.1f}s)   (existing img2dataset folder)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
