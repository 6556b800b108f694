"""Bench: trainer step time with the real mixture loader against one batch held in memory.

Both runs are the same ZeRO-3 trainer (world size 1, CPU, fp32) on the same model. The
loader run reads the mixture stream (shard index preads, token-cache memmaps) and packs in
a DataLoader worker; the baseline repeats one packed batch that is already in memory, so
it measures compute alone. Loader stall = (loader step time / in-memory step time) - 1;
the goal is < 5%.

    python bench/train_step.py [--samples 2000] [--steps 40] [--micro-batch 16] [--workers 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shutil
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class HeldBatch:
    """A source that serves one step's packed batches forever (the no-I/O baseline)."""

    def __init__(self, step, like):
        self.step, self.plan_hash, self.token_shape = step, like.plan_hash, None
        self.global_batch_size, self.sources, self.groups = like.global_batch_size, like.sources, like.groups

    def num_steps(self):
        return None

    def steps(self, start, rank, world_size, micro_batches, collate, num_workers=0):
        return itertools.repeat(self.step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="bench-data/train_step", help="work folder (reused between runs)")
    ap.add_argument("--samples", type=int, default=2000, help="shapes-world records to ingest (default: 2000)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: 40)")
    ap.add_argument("--micro-batch", type=int, default=16, help="samples per step (default: 16)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers (default: 1)")
    ap.add_argument("--hidden", type=int, default=256, help="LLM width (default: 256)")
    args = ap.parse_args()

    from bench.loader import prepare
    from vpit.model.build import ModelConfig
    from vpit.train.config import DataConfig, TrainConfig
    from vpit.train.data import MixtureSource
    from vpit.train.run_log import read_metrics
    from vpit.train.trainer import Trainer

    data = Path(args.data).resolve()
    _, shards, fp = prepare(data, args.samples)
    spec = data / "train_step.yaml"
    spec.write_text(
        f"seed: 0\ncache: {fp}\nrepetition: allow\nsources:\n"
        f"  vqa: {{path: {shards}, group: understanding, kind: understanding}}\n"
        f"  chat: {{path: {shards}, group: understanding, kind: text}}\n"
        f"groups:\n  understanding: {args.micro_batch * (args.steps + 2)}\n"
    )
    probe = MixtureSource(str(spec), {}, args.micro_batch)
    m, d = probe.token_shape
    model = ModelConfig(
        tokenizer="qwen2.5",
        chat_template="chatml",
        vision_dim=d,
        num_visual_tokens=m,
        hidden_size=args.hidden,
        num_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
    )
    base = TrainConfig(
        output_dir=str(data / "run-loader"),
        model=model,
        micro_batch_size=args.micro_batch,
        max_steps=args.steps,
        lr=1e-4,
        lr_reference_batch=args.micro_batch,
        save_every=10**6,
        data=DataConfig(mixture=str(spec), max_len=2048, num_workers=args.workers),
    )
    results, source = {}, None
    for name in ("loader", "in-memory"):
        cfg = dataclasses.replace(base, output_dir=str(data / f"run-{name}"))
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        trainer = Trainer(cfg, source=source)
        trainer.train()
        if source is None:  # the baseline: the loader's first batch, held in memory
            source = HeldBatch(next(trainer.source.steps(0, 0, 1, 1, trainer.collate, 0)), trainer.source)
        rows = read_metrics(cfg.output_dir)[3:]  # skip warm-up steps
        results[name] = (
            sum(r["step_s"] for r in rows) / len(rows),
            sum(r["data_s"] for r in rows) / len(rows),
            sum(r["tokens"] for r in rows) / len(rows),
        )
    (t_load, wait_load, tok_load), (t_mem, _, tok_mem) = results["loader"], results["in-memory"]
    print(f"\nmodel hidden {args.hidden}, {args.micro_batch} samples/step, {args.workers} loader worker(s)")
    print(f"in-memory batch:  {t_mem * 1000:7.1f} ms/step  ({tok_mem:.0f} tokens/step)")
    print(
        f"mixture loader:   {t_load * 1000:7.1f} ms/step  ({tok_load:.0f} tokens/step), "
        f"of which waiting for data {wait_load * 1000:.1f} ms"
    )
    stall = wait_load / t_load
    print(
        f"loader stall: {100 * stall:.1f}% of the step waiting for data (goal < 5%); "
        f"step-time ratio loader / in-memory = {t_load / t_mem:.2f} (per-token: "
        f"{(t_load / tok_load) / (t_mem / tok_mem):.2f})"
    )


if __name__ == "__main__":
    main()
