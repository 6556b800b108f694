"""Bench: the training stream from object storage (S3) against the same data on local disk.

The dataset of bench/loader.py (LLaVA-style shards with a tiny-SigLIP fp16 token cache) is put on
an S3 store: moto's server on 127.0.0.1 (started here), or the store the standard AWS variables
name when AWS_ENDPOINT_URL is set and --url is given. The same two-group mixture then streams
every sample with its tokens, in one process:

- local: the dataset folder on local disk (the baseline);
- S3, cold: an empty node cache, so every shard's index, records and token file is fetched;
- S3, warm: the node cache as the cold pass left it (bounded by --cache-bytes).

The plan is made once per case, outside the timing (a run plans once); its time is printed.

Each pass is timed --repeats times after a warm-up (the cold one from an emptied cache each
time) and the best is kept. It prints samples/s, the ratios to local disk (goal: warm >= 0.8x),
and the bytes a training node fetched against the bytes of the image tars it did not need.

    python bench/remote.py [--samples 2000] [--batch-size 32] [--workers 0]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import prepare  # noqa: E402  (bench/loader.py: the same data)


def stream(plan, batch_size: int, workers: int) -> int:
    """Every sample of the plan with its tokens (the plan is made once per run, outside the timing)."""
    import torch

    from vpit.mixtures import MixtureStream

    n = 0
    loader = torch.utils.data.DataLoader(
        MixtureStream(plan, global_batch_size=batch_size), batch_size=None, num_workers=workers, collate_fn=lambda b: b
    )
    for batch in loader:
        for item in batch:
            assert "skipped" not in item, item["skipped"]
            n += item["tokens"].shape[0] >= 0
    return n


def best_of(fn, repeats: int, before=None) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeats):
        if before:
            before()
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return best, n


def start_s3() -> object | None:
    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/vpit-bench-loader", help="work folder (bench/loader.py's, reused)")
    p.add_argument("--samples", type=int, default=2000, help="raw records to generate (default: 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per case (best kept)")
    p.add_argument("--url", default="s3://vpit-bench/shards", help="where the dataset is put (default: a moto bucket)")
    p.add_argument("--cache-bytes", default="8G", help="the node cache's bound (VPIT_CACHE_BYTES)")
    args = p.parse_args()

    import logging

    import fsspec
    import torch

    from vpit.pipelines.shards import Dataset
    from vpit.storage import node_cache

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    data = Path(args.data)
    _, shards, fp = prepare(data, args.samples)
    ds = Dataset(shards)
    server = start_s3()
    cache_dir = data / "node-cache"
    os.environ.update(VPIT_CACHE_DIR=str(cache_dir), VPIT_CACHE_BYTES=args.cache_bytes)
    fs, path = fsspec.core.url_to_fs(args.url)
    if server is not None:
        fs.mkdir(path.split("/")[0])
    t = time.perf_counter()
    for f in sorted(shards.rglob("*")):
        rel = f.relative_to(shards).as_posix()
        if f.is_file() and not f.name.startswith(".") and (not rel.startswith("tokens/") or f"/{fp}/" in f"/{rel}"):
            fs.put_file(str(f), f"{path}/{rel}")
    upload_s = time.perf_counter() - t

    kinds = ds.manifest["kinds"]
    body = (
        f"seed: 0\ncache: {fp}\nsources:\n"
        "  vqa: {{path: {root}, group: understanding, kind: understanding}}\n"
        "  chat: {{path: {root}, group: text, kind: text}}\n"
        f"groups:\n  understanding: {kinds['understanding']}\n  text: {kinds['text']}\n"
    )
    local_spec, remote_spec = data / "bench-local.yaml", data / "bench-remote.yaml"
    local_spec.write_text(body.format(root=shards))
    remote_spec.write_text(body.format(root=args.url))

    passes = itertools.count()

    def empty_cache() -> None:  # a cold pass: a fresh, empty cache folder (the last one is kept to measure)
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.environ["VPIT_CACHE_DIR"] = str(cache_dir / f"cold-{next(passes)}")

    from vpit.mixtures import load_spec, make_plan

    t = time.perf_counter()
    local_plan = make_plan(load_spec(local_spec))
    local_plan_s = time.perf_counter() - t
    t = time.perf_counter()
    remote_plan = make_plan(load_spec(remote_spec))  # manifests, catalogs, cache markers from S3
    remote_plan_s = time.perf_counter() - t
    run_local = lambda: stream(local_plan, args.batch_size, args.workers)  # noqa: E731
    run_remote = lambda: stream(remote_plan, args.batch_size, args.workers)  # noqa: E731
    run_local()  # warm-up: page cache, imports
    t_local, n_local = best_of(run_local, args.repeats)
    t_cold, n_cold = best_of(run_remote, args.repeats, before=empty_cache)
    cached = sum(e.stat().st_size for e in os.scandir(node_cache().objects))
    t_warm, n_warm = best_of(run_remote, args.repeats)
    assert n_local == n_cold == n_warm == len(ds), (n_local, n_cold, n_warm, len(ds))
    tar_bytes = sum(s["tar_bytes"] for s in ds.shards)
    rate = {"local": n_local / t_local, "cold": n_cold / t_cold, "warm": n_warm / t_warm}
    where = "moto server on 127.0.0.1" if server else os.environ["AWS_ENDPOINT_URL"]
    print(
        f"{len(ds)} samples in {len(ds.shards)} shards, token cache {fp}; global batch {args.batch_size}, "
        f"{args.workers} DataLoader workers; S3: {where} (upload {upload_s:.1f} s)"
    )
    print(f"  planning (once per run): local {local_plan_s:.2f} s, S3 {remote_plan_s:.2f} s")
    print(f"  local disk                          {rate['local']:>9.0f} samples/s")
    print(f"  S3, cold node cache                 {rate['cold']:>9.0f} samples/s")
    print(f"  S3, warm node cache                 {rate['warm']:>9.0f} samples/s")
    print(f"  warm / local = {rate['warm'] / rate['local']:.2f}x (goal >= 0.8)")
    print(f"  cold / local = {rate['cold'] / rate['local']:.2f}x")
    print(
        f"  fetched into the node cache: {cached / 2**20:.1f} MiB (indexes, records, tokens); "
        f"the image tars it did not fetch: {tar_bytes / 2**20:.1f} MiB"
    )
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
