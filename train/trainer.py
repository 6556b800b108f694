"""The VPiT trainer: DeepSpeed ZeRO-3, one loop (`train`), one step (`train_step`).

Launch with `deepspeed` or `torchrun` (any world size), or run directly as a world of one.
Every rank builds the same model from the same seed; DeepSpeed shards it. Each rank reads
its fixed slice of every global batch from the source, so the run is a pure function of
(config, plan): a resumed run continues the exact sample sequence and loss trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from vpit.errors import ConfigError
from vpit.model.build import build_model
from vpit.model.chat_template import ImageTokens, get_template
from vpit.train.checkpoint import ResumeState, latest_checkpoint, load_checkpoint, save_checkpoint
from vpit.train.collate import Collator, PackedBatch
from vpit.train.config import TrainConfig
from vpit.train.data import BatchSource, make_source
from vpit.train.parallelize import barrier, ds_config, init_distributed, initialize
from vpit.train.run_log import RunLog

__all__ = ["Trainer", "lr_schedule"]

# torch 2.13 deprecates collective names DeepSpeed 0.19 still calls, once per step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def lr_schedule(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Builds the model, the ZeRO-3 engine and the data source from a TrainConfig.

    Args:
        cfg: the training config.
        source: a batch source; default: the one `cfg.data` names.
    """

    def __init__(self, cfg: TrainConfig, source: BatchSource | None = None):
        self.cfg = cfg
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.dist = init_distributed()
        self.run_dir = Path(cfg.output_dir)
        self.global_batch = cfg.micro_batch_size * self.dist.world_size * cfg.grad_accum
        self.lr = cfg.lr * math.sqrt(self.global_batch / cfg.lr_reference_batch)
        torch.manual_seed(cfg.seed)  # same init on every rank; DeepSpeed then shards it
        model, self.tokenizer = build_model(cfg.model)
        if cfg.stage == 1:
            model.llm.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model_config = model.config
        self.source = source or make_source(cfg.data, cfg.micro_batch_size * self.dist.world_size, cfg.model)
        shape = getattr(self.source, "token_shape", None)
        if shape and shape != (cfg.model.num_visual_tokens, cfg.model.vision_dim):
            raise ConfigError(
                f"model.num_visual_tokens/vision_dim: the config says ({cfg.model.num_visual_tokens}, "
                f"{cfg.model.vision_dim}) but the mixture's token cache holds tokens of shape {shape}"
            )
        have = self.source.num_batches()
        if have is not None and have < cfg.max_steps * cfg.grad_accum:
            raise ConfigError(
                f"max_steps: {cfg.max_steps} steps x grad_accum {cfg.grad_accum} need "
                f"{cfg.max_steps * cfg.grad_accum} global batches of {cfg.micro_batch_size * self.dist.world_size}"
                f" samples, but the mixture plans only {have}; lower max_steps or grow the mixture"
            )
        ds = ds_config(
            cfg.deepspeed,
            on_gpu=self.dist.on_gpu,
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
            world_size=self.dist.world_size,
            grad_clip=cfg.grad_clip,
        )
        self.engine = initialize(
            model,
            ds,
            self.lr,
            cfg.betas,
            cfg.weight_decay,
            lambda s: lr_schedule(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio),
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
        self.dtype = torch.bfloat16 if self.dist.on_gpu else torch.float32
        self.step = self.micro_steps = 0
        self.log = RunLog(self.run_dir, self.dist.rank, cfg.loggers, dataclasses.asdict(cfg))

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train to cfg.max_steps; with `resume`, from the latest complete checkpoint."""
        self._prepare_run_dir(resume)
        batches = self.source.batches(
            self.micro_steps, self.dist.rank, self.dist.world_size, self.collate, self.cfg.data.num_workers
        )
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", disable=self.dist.rank != 0)
        while self.step < self.cfg.max_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.cfg.grad_accum)]
            t1 = time.perf_counter()
            row = self.train_step(micro)
            row.update(data_s=t1 - t0, step_s=time.perf_counter() - t0)
            row.update(tokens_per_s=row["tokens"] / row["step_s"], samples_per_s=row["samples"] / row["step_s"])
            self.log.log(row, [i for b in micro for i in b.sample_ids])
            bar.update(1)
            bar.set_postfix(text=f"{row['text_loss']:.3f}", vision=f"{row['vision_loss']:.3f}")
            evaluate = self.cfg.eval_every and self.step % self.cfg.eval_every == 0
            if evaluate or self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps:
                ckpt = self.save()
            if evaluate:
                self._evaluate(ckpt)
        bar.close()
        return self._finish()

    def train_step(self, micro: list[PackedBatch]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro batches; metrics averaged over ranks."""
        lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in engine.step)
        sums = torch.zeros(7, dtype=torch.float64)
        for batch in micro:
            out = self.engine(**batch.model_inputs(self.dist.device, self.dtype))
            self.engine.backward(out.loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            sums += torch.tensor(
                [
                    out.loss.item(),
                    out.text_loss.item(),
                    out.vision_loss.item(),
                    batch.n_tokens,
                    len(batch.sample_ids),
                    batch.truncated,
                    batch.dropped,
                ],
                dtype=torch.float64,
            )
        self.micro_steps += len(micro)
        self.step += 1
        torch.distributed.all_reduce(sums)
        n = len(micro) * self.dist.world_size
        return {
            "step": self.step,
            "loss": sums[0].item() / n,
            "text_loss": sums[1].item() / n,
            "vision_loss": sums[2].item() / n,
            "lr": lr,
            "tokens": int(sums[3]),
            "samples": int(sums[4]),
            "truncated": int(sums[5]),
            "dropped": int(sums[6]),
        }

    def _evaluate(self, ckpt: Path) -> None:
        """Rank 0 evaluates the checkpoint just written; the others wait for it."""
        if self.dist.rank == 0:
            from vpit.train.evaluate import evaluate_run

            metrics = evaluate_run(
                ckpt, suite=self.cfg.eval_suite, max_per_source=self.cfg.eval_max_per_source, step=self.step
            )
            shown = {k: round(v, 4) for k, v in metrics.items() if "/" in k and isinstance(v, float)}
            tqdm.write(f"eval at step {self.step}: {shown}")
        barrier()

    def save(self) -> Path:
        state = ResumeState(
            step=self.step,
            micro_steps=self.micro_steps,
            plan_hash=self.source.plan_hash,
            world_size=self.dist.world_size,
        )
        return save_checkpoint(self.engine, self.run_dir, state, self.dist.rank, self.cfg.keep_checkpoints)

    def _prepare_run_dir(self, resume: bool) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and not resume:
            raise ConfigError(
                f"output_dir {self.run_dir} already holds checkpoints (latest {ckpt.name}); "
                "pass --resume to continue it, or choose another output_dir"
            )
        if ckpt is not None:
            state = load_checkpoint(self.engine, ckpt, self.source.plan_hash)
            self.step, self.micro_steps = state.step, state.micro_steps
            if self.dist.rank == 0:
                print(
                    f"resumed from {ckpt.name}: step {self.step}, {self.micro_steps} micro batches consumed", flush=True
                )
        else:  # a fresh run: logs of an earlier run that never checkpointed are stale
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / f"samples-rank{self.dist.rank}.jsonl").unlink(missing_ok=True)
            if self.dist.rank == 0:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.dist.rank == 0:
            self._write_run_files()
        barrier()

    def _write_run_files(self) -> None:
        """What `vpit export` needs besides the checkpoint: config, tokenizer, LLM config."""
        (self.run_dir / "config.yaml").write_text(
            yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(self.cfg))), sort_keys=False)
        )
        model_dir = self.run_dir / "model"
        self.tokenizer.save_pretrained(model_dir)
        self.engine.module.llm.config.save_pretrained(model_dir)
        self.model_config.save(model_dir / "vpit.json")

    def _finish(self) -> dict[str, Any]:
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
        }
        barrier()
        return summary
