"""The VPiT trainer: DeepSpeed ZeRO-3, one loop (`train`), one step (`train_step`).

Launch with `deepspeed` or `torchrun` (any world size), or run directly as a world of one.
The model is built sharded (zero.Init), so no rank ever holds all of it. The data position is
the optimizer step: step k trains on global batch k of the stream (micro_batch_size x
world_size x grad_accum samples, fixed for a run), each rank on its share. Losses are
normalised by the whole global batch's target counts, so a step's gradient is the same
however the batch is split among ranks and micro steps: a run resumed on another number of
GPUs (through a universal checkpoint) continues the same sample sequence and trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from vpit.config import to_plain
from vpit.errors import ConfigError, InputError
from vpit.model.build import build_model
from vpit.model.chat_template import IGNORE, ImageTokens, get_template
from vpit.train.checkpoint import (
    ResumeState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    universal_checkpoint,
)
from vpit.train.collate import Collator, PackedBatch
from vpit.train.config import TrainConfig
from vpit.train.data import BatchSource, make_source
from vpit.train.parallelize import all_reduce, barrier, ds_config, init_distributed, initialize, sharded_build
from vpit.train.run_log import RunLog, peak_flops

__all__ = ["Trainer", "lr_schedule", "preemption"]

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def lr_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def preemption() -> Iterator[dict[str, int]]:
    """SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before a kill) only sets a flag: the loop
    checkpoints at the next step boundary and exits 0. The old handlers come back afterwards."""
    flag = {"signal": 0}
    old = {s: signal.signal(s, lambda signum, frame: flag.update(signal=signum)) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Trainer:
    """Builds the model (sharded), the ZeRO-3 engine and the data source from a TrainConfig.

    Args:
        cfg: the training config.
        source: a batch source; default: the one `cfg.data` names.
        resume: continue cfg.output_dir from its latest complete checkpoint (at any world size).
        start_step: a fresh run starts at this data position (stage 2 after stage 1, train.stages),
            with its own learning-rate schedule over the steps from there to max_steps.
    """

    def __init__(self, cfg: TrainConfig, source: BatchSource | None = None, resume: bool = False, start_step: int = 0):
        self.cfg = cfg
        self.dist = init_distributed()
        self.run_dir = Path(cfg.output_dir)
        self.lock = self._hold_run_dir()
        world, accum = self.dist.world_size, cfg.grad_accum
        self.global_batch = cfg.micro_batch_size * world * accum
        self.lr = cfg.lr * math.sqrt(self.global_batch / cfg.lr_reference_batch)
        self.source = source or make_source(cfg.data, self.global_batch, cfg.model, self.run_dir / "plan")
        if cfg.max_steps is None:  # one pass over the mixture
            self.cfg = cfg = dataclasses.replace(cfg, max_steps=self.source.num_steps())
        self._check_data()
        ds = ds_config(
            cfg.deepspeed,
            on_gpu=self.dist.on_gpu,
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=accum,
            world_size=world,
            grad_clip=cfg.grad_clip,
        )
        self.resume_from = self._resume_point(resume)
        if self.resume_from and self.resume_from[1].world_size != world:
            ds["checkpoint"] = {"load_universal": True}  # the shards of another world size, re-cut
        self.dtype = torch.bfloat16 if self.dist.on_gpu else torch.float32
        torch.manual_seed(cfg.seed)  # the same init on every rank; each keeps its shard
        with sharded_build(ds, self.dtype) if cfg.zero_init else contextlib.nullcontext() as sharding:
            model, self.tokenizer = build_model(cfg.model, self.dtype, sharding)
        self.vision_coef = model.config.vision_coef
        if cfg.stage == 1:
            model.llm.requires_grad_(False)
            if not cfg.stage1_vision_head:  # MetaMorph's stage 1: the projector alone, on the text loss
                model.vision_head.requires_grad_(False)
                self.vision_coef = 0.0
        if cfg.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model_config = model.config
        self.engine = initialize(
            model,
            ds,
            self.lr,
            cfg.betas,
            cfg.weight_decay,
            lambda s: lr_schedule(s, cfg.warmup_steps, cfg.max_steps - start_step, cfg.min_lr_ratio),
        )
        mc = model.config
        self.collate = Collator(
            self.tokenizer,
            get_template(mc.chat_template),
            ImageTokens(mc.image_start_id, mc.image_end_id, mc.num_visual_tokens),
            mc.vision_dim,
            cfg.data.max_len,
            cfg.data.overflow,
        )
        self.step = start_step
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.peak = peak_flops(cfg.peak_tflops, self.dist.device)
        self.log = RunLog(self.run_dir, self.dist.rank, cfg.loggers, to_plain(cfg))
        self._heldout: list | None = None
        self._skips_in_a_row = self._skips_total = self._samples_total = 0
        self._judge: Any = None  # the shapes-world token judge (False: none applies), made at the first evaluation
        if (cfg.eval_every or cfg.eval_at_end) and cfg.data.mixture:  # no held-out split: fail now, not at the end
            from vpit.train.evaluate import heldout_for

            self._heldout = heldout_for(cfg)

    def _check_data(self) -> None:
        cfg, shape = self.cfg, getattr(self.source, "token_shape", None)
        if shape and shape != (cfg.model.num_visual_tokens, cfg.model.vision_dim):
            raise ConfigError(
                f"model.num_visual_tokens/vision_dim: the config says ({cfg.model.num_visual_tokens}, "
                f"{cfg.model.vision_dim}) but the mixture's token cache holds tokens of shape {shape}"
            )
        have = self.source.num_steps()
        if have is not None and have < cfg.max_steps:
            raise ConfigError(
                f"max_steps: {cfg.max_steps} steps need {cfg.max_steps} global batches of "
                f"{self.global_batch} samples, but the mixture plans only {have}; lower max_steps or "
                "grow the mixture"
            )

    def _resume_point(self, resume: bool) -> tuple[Path, ResumeState] | None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return None
        if not resume:
            raise ConfigError(
                f"output_dir {self.run_dir} already holds checkpoints (latest {ckpt.name}); "
                "pass --resume to continue it, or choose another output_dir"
            )
        state = read_state(ckpt)
        if state.plan_hash != self.source.plan_hash:
            raise ConfigError(
                f"--resume: checkpoint {ckpt} was trained on mixture plan {state.plan_hash}, but the "
                f"config now gives plan {self.source.plan_hash}; resume with the same mixture or use "
                "a new output_dir"
            )
        if state.global_batch != self.global_batch:
            raise ConfigError(
                f"--resume: {ckpt} was trained with a global batch of {state.global_batch} samples (micro_batch_size "
                f"x world_size x grad_accum), this run has {self.global_batch} ({self.cfg.micro_batch_size} x "
                f"{self.dist.world_size} x {self.cfg.grad_accum}); the sample sequence is defined by it, so keep it: "
                f"set grad_accum (or micro_batch_size) so that the product is {state.global_batch} again"
            )
        if state.world_size != self.dist.world_size:
            if self.dist.rank == 0:
                universal_checkpoint(ckpt)  # once: DeepSpeed refuses ZeRO-3 shards of another world size
            barrier()
        return ckpt, state

    # -- the loop ------------------------------------------------------------------------------
    def _hold_run_dir(self) -> Any:
        """Rank 0 holds the run folder for the run (`vpit.lock`); every rank stops if it cannot: a
        second `vpit train` into the same folder would interleave checkpoints and metrics."""
        from vpit.lock import FolderLock, LockedError

        lock, why = None, ""
        if self.dist.rank == 0:
            try:
                lock = FolderLock(self.run_dir, "vpit train").acquire()
            except LockedError as e:
                why = str(e)
        if self.dist.world_size > 1:
            blocked = all_reduce([1.0 if why else 0.0], self.dist, op="max")  # self.dist has .device
            if blocked.item() > 0:
                raise LockedError(why or f"rank 0 could not take {self.run_dir}: another writer holds it")
        elif why:
            raise LockedError(why)
        return lock

    def _budget_skips(self, row: dict[str, Any], skipped: list[dict[str, Any]]) -> None:
        """Log this rank's skipped records to RUN/skipped-rankR.jsonl; stop every rank when the global
        count (all-reduced in the step's metrics) goes past the loader's error budget."""
        if skipped:
            with open(self.run_dir / f"skipped-rank{self.dist.rank}.jsonl", "a", encoding="utf-8") as f:
                for sk in skipped:
                    f.write(json.dumps({"step": self.step, **sk}) + "\n")
            print(f"step {self.step}: skipped {sk['id']} ({sk['error']})", file=sys.stderr)
        data = self.cfg.data
        self._skips_in_a_row = self._skips_in_a_row + 1 if row["skipped"] else 0
        self._skips_total += row["skipped"]
        self._samples_total += row["samples"] + row["skipped"]
        if self._skips_in_a_row >= data.max_skipped_in_a_row or (
            self._skips_total > data.max_skipped_share * self._samples_total and self._skips_total > 1
        ):
            raise InputError(
                f"the loader skipped {self._skips_total} unreadable record(s) of {self._samples_total} "
                f"({self._skips_in_a_row} step(s) in a row), past its error budget (data.max_skipped_in_a_row "
                f"{data.max_skipped_in_a_row}, data.max_skipped_share {data.max_skipped_share}); they are listed in "
                f"{self.run_dir}/skipped-rank*.jsonl: check the datasets with `vpit verify DATASET`, fix them "
                "(re-run their ingest or precompute), then resume with --resume"
            )

    def close(self) -> None:
        """Let go of the run folder (train() does when it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def train(self) -> dict[str, Any]:
        """Train to cfg.max_steps (or a pre-emption signal, then checkpoint and stop)."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict[str, Any]:
        self._prepare_run_dir()
        steps = self.source.steps(
            self.step,
            self.dist.rank,
            self.dist.world_size,
            self.cfg.grad_accum,
            self.collate,
            self.cfg.data.num_workers,
        )
        try:
            return self._run_steps(steps)
        finally:
            steps.close()  # stops the loader workers now (see data._closing)

    def _run_steps(self, steps) -> dict[str, Any]:
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", disable=self.dist.rank != 0)
        preempted = 0
        with preemption() as flag:
            self.engine.train()
            while self.step < self.cfg.max_steps:
                t0 = time.perf_counter()
                micro = next(steps)
                t1 = time.perf_counter()
                row = self.train_step(micro)
                row.update(data_s=t1 - t0, step_s=time.perf_counter() - t0)
                row.update(tokens_per_s=row["tokens"] / row["step_s"], samples_per_s=row["samples"] / row["step_s"])
                if self.peak:  # 6 N flops per token (forward + backward), attention not counted
                    row["mfu"] = 6 * self.n_params * row["tokens_per_s"] / (self.dist.world_size * self.peak)
                self.log.log(row, [i for b in micro for i in b.sample_ids])
                self._budget_skips(row, [sk for b in micro for sk in b.skipped])
                bar.update(1)
                bar.set_postfix(text=f"{row['text_loss']:.3f}", vision=f"{row['vision_loss']:.3f}")
                every = self.cfg.eval_every
                last = self.step == self.cfg.max_steps
                if (every and self.step % every == 0) or (last and (every or self.cfg.eval_at_end)):
                    self.evaluate()
                preempted = int(all_reduce([flag["signal"]], self.engine, op="max").tolist()[0])  # any rank's signal
                if preempted or last or self.step % self.cfg.save_every == 0:
                    self.save()
                if preempted:
                    break
        bar.close()
        return self._finish(preempted)

    def train_step(self, micro: list[PackedBatch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro batches, normalised by the global batch."""
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in engine.step)
        dev, world = self.engine.device, self.dist.world_size
        n_text, n_vision = all_reduce(
            [sum(b.n_text for b in micro), sum(b.n_vision for b in micro)], self.engine
        ).tolist()
        # DeepSpeed averages over micro steps and ranks; scaling by their number makes the step's
        # gradient that of (summed losses) / (the global batch's target counts).
        scale = world * len(micro)
        names = list(self.source.sources)
        per_source = torch.zeros(len(names), 5, dtype=torch.float64)  # text sum, n, vision sum, n, samples
        local = torch.zeros(8, dtype=torch.float64)  # text, vision sums, tokens, padded, samples, trunc, drop, skip
        for batch in micro:
            out = self.engine(**batch.model_inputs(dev, self.dtype), return_token_losses=True)
            loss = scale * (
                out.text_sum / max(float(n_text), 1.0) + self.vision_coef * out.vision_sum / max(float(n_vision), 1.0)
            )
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            local += torch.tensor(
                [
                    out.text_sum.item(),
                    out.vision_sum.item(),
                    batch.n_tokens,
                    batch.padded_tokens,
                    len(batch.sample_ids),
                    batch.truncated,
                    batch.dropped,
                    len(batch.skipped),
                ],
                dtype=torch.float64,
            )
            per_source += _per_source(batch, out, names)
        self.step += 1
        sums = all_reduce(torch.cat([local, per_source.flatten()]), self.engine).cpu()
        slowest = all_reduce([float(local[2])], self.engine, op="max").tolist()[0]
        (text, vision, tokens, padded, samples, truncated, dropped, skipped), src = (
            sums[:8].tolist(),
            sums[8:].view(-1, 5),
        )
        row = {
            "step": self.step,
            "lr": lr,
            "text_loss": text / max(float(n_text), 1.0),
            "vision_loss": vision / max(float(n_vision), 1.0),
            "tokens": int(tokens),
            "samples": int(samples),
            "truncated": int(truncated),
            "dropped": int(dropped),
            "skipped": int(skipped),
            "padding_share": 1 - tokens / max(padded, 1),
            "slowest_rank_tokens_ratio": slowest * world / max(tokens, 1),
        }
        row["loss"] = row["text_loss"] + self.vision_coef * row["vision_loss"]
        row.update(_breakdown(src, names, self.source.groups))
        return row

    # -- evaluation, checkpoints, run files --------------------------------------------------
    def evaluate(self) -> dict[str, Any] | None:
        """Evaluate the live model on the held-out split, the items shared among ranks; rank 0
        writes RUN/eval/step-N.json. Every rank calls this (the forward passes are collective)."""
        from vpit.train.evaluate import evaluate_sharded, heldout_for, judge_for

        if self._heldout is None:  # the same items at every evaluation: read once per run
            self._heldout = heldout_for(self.cfg)
        if self._judge is None and self.dist.rank == 0:  # only rank 0 summarises
            from vpit.mixtures import load_spec

            spec = load_spec(self.cfg.data.mixture, dict(self.cfg.data.mixture_overrides) or None)
            self._judge = judge_for(spec, self._heldout) or False
        self.engine.eval()
        metrics = evaluate_sharded(
            self.engine.module,
            self.tokenizer,
            self._heldout,
            suite=self.cfg.eval_suite,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            max_len=self.cfg.data.max_len,
            judge=self._judge or None,
        )
        self.engine.train()
        if self.dist.rank == 0:
            from vpit.train.evaluate import write_eval

            write_eval(self.run_dir, self.step, metrics)
            shown = {k: round(v, 4) for k, v in metrics.items() if "/" in k and isinstance(v, float)}
            tqdm.write(f"eval at step {self.step}: {shown}")
        return metrics if self.dist.rank == 0 else None

    def save(self) -> Path:
        state = ResumeState(
            step=self.step,
            global_batch=self.global_batch,
            plan_hash=self.source.plan_hash,
            world_size=self.dist.world_size,
        )
        return save_checkpoint(self.engine, self.run_dir, state, self.dist.rank, self.cfg.keep_checkpoints)

    def _prepare_run_dir(self) -> None:
        if self.resume_from is not None:
            ckpt, state = self.resume_from
            load_checkpoint(self.engine, ckpt, universal=state.world_size != self.dist.world_size)
            self.step = state.step
            # Steps after the checkpoint were trained by a state that is gone and are trained again:
            # their log lines go, so every step (and every sample id) is logged once.
            logs = [f"samples-rank{self.dist.rank}.jsonl", f"skipped-rank{self.dist.rank}.jsonl"]
            for name in logs + (["metrics.jsonl"] if self.dist.rank == 0 else []):
                _cut_log(self.run_dir / name, self.step)
            for path in self._logs_of_gone_ranks():  # saved at a larger world size: rank 0 cuts theirs
                _cut_log(path, self.step)
            if self.dist.rank == 0:
                how = (
                    f" (saved at world size {state.world_size}, re-cut for {self.dist.world_size})"
                    if state.world_size != self.dist.world_size
                    else ""
                )
                print(
                    f"resumed from {ckpt.name}{how}: step {self.step}, {self.step * self.global_batch} samples "
                    "consumed",
                    flush=True,
                )
        else:  # a fresh run: logs of an earlier run that never checkpointed are stale
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"samples-rank{self.dist.rank}.jsonl").unlink(missing_ok=True)
            if self.dist.rank == 0:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
                for path in self._logs_of_gone_ranks():
                    path.unlink()
        if self.dist.rank == 0:
            self._write_run_files()
        barrier()

    def _logs_of_gone_ranks(self) -> list[Path]:
        """Rank 0's list of per-rank logs of ranks this world does not have."""
        if self.dist.rank != 0:
            return []
        ranks = ((p, re.search(r"-rank(\d+)\.jsonl$", p.name)) for p in self.run_dir.glob("*-rank*.jsonl"))
        return [p for p, m in ranks if m and int(m.group(1)) >= self.dist.world_size]

    def _write_run_files(self) -> None:
        """What `vpit export` needs besides the checkpoint: config, tokenizer, LLM config."""
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(json.loads(json.dumps(to_plain(self.cfg))), sort_keys=False)
        )
        model_dir = self.run_dir / "model"
        self.tokenizer.save_pretrained(model_dir)
        self.engine.module.llm.config.save_pretrained(model_dir)
        self.model_config.save(model_dir / "vpit.json")

    def _finish(self, preempted: int) -> dict[str, Any]:
        from vpit.train.run_log import read_metrics

        png = self.log.finish()
        rows = read_metrics(self.run_dir)
        summary = {
            "steps": self.step,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "loss_png": str(png),
            "first": rows[0] if rows else None,
            "last": rows[-1] if rows else None,
            "preempted": signal.Signals(preempted).name if preempted else None,
        }
        barrier()
        return summary


def _per_source(batch: PackedBatch, out: Any, names: list[str]) -> torch.Tensor:
    """(sources, 5) sums of this micro batch: text loss, text targets, vision loss, visual targets, samples."""
    index = torch.full(batch.labels.shape, -1, dtype=torch.long)
    for (row, start, end), source in zip(batch.spans, batch.sources, strict=True):
        index[row, start:end] = names.index(source) if source in names else -1
    text_mask = torch.zeros_like(batch.vision_target)
    text_mask[:, 1:] = batch.labels[:, 1:] != IGNORE
    vis_mask = torch.zeros_like(batch.vision_target)
    vis_mask[:, 1:] = batch.vision_target[:, 1:]
    out_t, out_v = out.text_token_loss.detach().double().cpu(), out.vision_token_loss.detach().double().cpu()
    sums = torch.zeros(len(names), 5, dtype=torch.float64)
    for col, (values, mask) in enumerate(((out_t, text_mask), (out_v, vis_mask))):
        keep = mask & (index >= 0)
        sums[:, 2 * col].index_add_(0, index[keep], values[keep])
        sums[:, 2 * col + 1].index_add_(0, index[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    for source in batch.sources:
        if source in names:
            sums[names.index(source), 4] += 1
    return sums


def _breakdown(src: torch.Tensor, names: list[str], groups: dict[str, str]) -> dict[str, float]:
    """Losses per source and per group, and the realised share of each group, from per-source sums."""
    out: dict[str, float] = {}
    total = float(src[:, 4].sum())
    by_group: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        t, nt, v, nv, n = src[i].tolist()
        if nt:
            out[f"text_loss/source/{name}"] = t / nt
        if nv:
            out[f"vision_loss/source/{name}"] = v / nv
        g = groups.get(name, name)
        by_group[g] = by_group.get(g, torch.zeros(5, dtype=torch.float64)) + src[i]
    for g, (t, nt, v, nv, n) in sorted((g, s.tolist()) for g, s in by_group.items()):
        if nt:
            out[f"text_loss/group/{g}"] = t / nt
        if nv:
            out[f"vision_loss/group/{g}"] = v / nv
        out[f"share/{g}"] = n / max(total, 1.0)
    return out


def _cut_log(path: Path, step: int) -> None:
    """Keep the lines of a JSONL log whose step is at most `step` (rewritten whole, then renamed)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
