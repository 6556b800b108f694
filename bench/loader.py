"""Bench: the mixed loader's samples/s against two baselines, on the same generated shards.

- mixed: `MixtureStream` over a two-group spec of the shards (understanding + text-only
  chat, kind-filtered), with each sample's cached visual tokens (fp16 cache -> float32):
  index lookup, one pread per record, a memmap slice per sample, thread prefetch.
- webdataset: a plain sequential `webdataset.WebDataset` read of the same tars, every
  member read and the JSON parsed: the I/O limit of these files. Goal: mixed >= 0.8x.
- llava-style: what MetaMorph/LLaVA loaders do: the whole raw JSON list in memory, and per
  sample the image file opened, decoded, preprocessed and run through the (tiny) encoder.
  Goal: mixed >= 5x.

All three deliver every sample once (no repetition), in one process; each is timed
`--repeats` times after a warm-up pass (page cache warm for all) and the best is kept.

    python bench/loader.py [--samples 2000] [--batch-size 32] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prepare(data: Path, samples: int) -> tuple[Path, Path, str]:
    """Raw LLaVA data -> shards (Ray ingest) -> tiny-SigLIP token cache. Idempotent: a re-run reuses it."""
    from vpit.demo.corpora import write_llava_dataset
    from vpit.model.encoder import EncoderConfig
    from vpit.pipelines.ingest import run_ingest
    from vpit.pipelines.llava import LlavaAdapter, LlavaConfig
    from vpit.pipelines.precompute import PrecomputeConfig, run_precompute

    raw = data / "raw"
    if not (raw / "data.jsonl").exists():
        write_llava_dataset(raw, samples, seed=0)
    adapter = LlavaAdapter(
        LlavaConfig(
            input=str(raw / "data.jsonl"), image_root=str(raw), source="shapes", shard_size=250, max_pixels=4_000_000
        )
    )
    run_ingest(adapter, data / "shards", workers=2, progress=False)
    report = run_precompute(
        data / "shards", EncoderConfig(encoder="tiny"), PrecomputeConfig(batch_size=64), progress=False
    )
    return raw, data / "shards", report.fingerprint


def mixed(spec: Path, batch_size: int, workers: int) -> int:
    import torch

    from vpit.mixtures import MixtureStream, load_spec, make_plan

    plan = make_plan(load_spec(spec))
    stream = MixtureStream(plan, global_batch_size=batch_size)
    n = 0
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b)
    for batch in loader:
        for item in batch:
            n += item["tokens"].shape[0] >= 0
    return n


def webdataset_read(tars: list[str]) -> int:
    import webdataset as wds

    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        json.loads(sample["json"])
        n += 1
    return n


def llava_style(raw: Path, encoder) -> int:
    import torch

    from vpit.model.encoder import decode_image

    records = [json.loads(line) for line in (raw / "data.jsonl").read_text().splitlines() if line]  # all in memory
    n = 0
    with torch.inference_mode():
        for rec in records:
            paths = rec.get("image") or []
            images = [decode_image((raw / p).read_bytes()) for p in ([paths] if isinstance(paths, str) else paths)]
            if images:
                encoder.encode(images)
            n += 1
    return n


def timed(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up: page cache, imports, lazy index loads
    best, n = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return best, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/vpit-bench-loader", help="work folder (reused across runs)")
    p.add_argument("--samples", type=int, default=2000, help="raw records to generate (default: 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size of the mixed loader")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the mixed loader")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per loader (best kept)")
    args = p.parse_args()

    import torch

    from vpit.model.encoder import EncoderConfig, tiny_encoder
    from vpit.pipelines.shards import Dataset

    torch.set_num_threads(1)  # one core per loader, as a DataLoader worker would have
    data = Path(args.data)
    raw, shards, fp = prepare(data, args.samples)
    ds = Dataset(shards)
    kinds = ds.manifest["kinds"]
    spec = data / "bench.yaml"
    spec.write_text(
        f"seed: 0\ncache: {fp}\nsources:\n"
        f"  vqa: {{path: shards, group: understanding, kind: understanding}}\n"
        f"  chat: {{path: shards, group: text, kind: text}}\n"
        f"groups:\n  understanding: {kinds['understanding']}\n  text: {kinds['text']}\n"
    )
    total = len(ds)
    encoder = tiny_encoder(EncoderConfig(encoder="tiny"))

    t_wds, n_wds = timed(lambda: webdataset_read(ds.tar_paths()), args.repeats)
    t_mix, n_mix = timed(lambda: mixed(spec, args.batch_size, args.workers), args.repeats)
    t_llava, n_llava = timed(lambda: llava_style(raw, encoder), max(1, args.repeats - 2))
    assert n_wds == n_mix == total, (n_wds, n_mix, total)
    rate = {"mixed": n_mix / t_mix, "webdataset": n_wds / t_wds, "llava": n_llava / t_llava}
    print(
        f"{total} samples ({', '.join(f'{k} {v}' for k, v in kinds.items())}) in {len(ds.shards)} shards, "
        f"token cache {fp}; mixed loader: global batch {args.batch_size}, {args.workers} DataLoader workers"
    )
    print(f"  mixed loader (records + cached tokens)   {rate['mixed']:>9.0f} samples/s")
    print(f"  webdataset sequential read (I/O limit)   {rate['webdataset']:>9.0f} samples/s")
    print(f"  llava-style (decode + encoder per sample){rate['llava']:>9.0f} samples/s")
    print(f"  mixed / webdataset = {rate['mixed'] / rate['webdataset']:.2f}x (goal >= 0.8)")
    print(f"  mixed / llava-style = {rate['mixed'] / rate['llava']:.1f}x (goal >= 5)")


if __name__ == "__main__":
    main()
