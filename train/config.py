"""The training config: typed frozen dataclasses (loaded by `vpit.config`, as every command's are).

The defaults alone make a runnable tiny run (a small Llama, the Qwen2.5 tokenizer, in-memory
shapes-world items): `vpit train --set max_steps=2` is a smoke test of the whole trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from vpit.config import load, path_field
from vpit.errors import ConfigError
from vpit.model.build import ModelConfig

__all__ = ["DataConfig", "TrainConfig", "TrainJob", "load_train_config"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    mixture: str | None = path_field(None)
    """Mixture spec YAML (relative to the training config's folder); none: in-memory synthetic items."""
    mixture_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Dotted overrides applied to the spec (e.g. groups.generation.count: 200k)."""
    synthetic: int = 512
    """Without a mixture: this many in-memory shapes-world items, cycled (smoke tests, GPU checks)."""
    max_len: int = 1024
    """Tokens per packed row."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """A sample over max_len: cut before a visual block (truncate) or skip it (drop); both counted."""
    num_workers: int = 1
    """DataLoader worker processes per rank (the sample sequence does not depend on it)."""
    balance: bool = True
    """Split each global batch among ranks and micro steps by estimated tokens (the same samples per
    step either way; ZeRO-3 runs at the pace of the slowest rank)."""
    max_skipped_in_a_row: int = 10
    """Unreadable records (a corrupt member, a truncated token file) are skipped and listed in
    RUN/skipped-rank*.jsonl; this many global batches in a row with a skip stop the run."""
    max_skipped_share: float = 0.001
    """...and so does a skipped share of all samples so far above this (0.001 = 0.1%)."""

    def __post_init__(self):
        if self.max_len < 8:
            raise ConfigError(f"data.max_len: expected >= 8, got {self.max_len}")
        if self.max_skipped_in_a_row < 1 or not 0 <= self.max_skipped_share < 1:
            raise ConfigError(
                "data.max_skipped_in_a_row / max_skipped_share: expected >= 1 / a fraction in [0, 1), got "
                f"{self.max_skipped_in_a_row} / {self.max_skipped_share}"
            )
        if self.num_workers < 0 or self.synthetic < 1:
            raise ConfigError("data.num_workers and data.synthetic: expected >= 0 and >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    output_dir: str = path_field("runs/vpit")
    """Run folder: checkpoints, metrics.jsonl, loss.png, the exported model's parts."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The VPiT model (model/build.py)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Where samples come from and how they are packed."""
    micro_batch_size: int = 4
    """Samples per rank per micro step on average (packed into rows of data.max_len); with data.balance
    a micro step gets as many as make its share of the global batch's estimated tokens."""
    grad_accum: int = 1
    """Micro steps per optimizer step. Global batch = micro_batch_size x world size x grad_accum."""
    max_steps: int | None = 100
    """Optimizer steps; null: one pass over the mixture (every global batch its plan holds)."""
    lr: float = 2e-5
    """Peak learning rate at a global batch of lr_reference_batch; scaled by sqrt(global/reference)."""
    lr_reference_batch: int = 256
    """The global batch at which `lr` applies unscaled."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to min_lr_ratio x peak at max_steps."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    stage: Literal[1, 2] = 2
    """1: freeze the LLM and train the projector on the text loss (MetaMorph's stage 1); 2: train everything."""
    stage2_from_phase: str | None = None
    """With stage 1: train stage 1 until the mixture's phase of this name begins, export it, and go on as
    stage 2 from that export in the same run (output_dir/stage1 holds stage 1): one spec, one run."""
    stage1_vision_head: bool = False
    """Stage 1 also trains the vision head on the vision loss (vpit's earlier stage 1; MetaMorph's does not)."""
    zero_init: bool = True
    """Build the model under deepspeed.zero.Init: each rank holds only its shard of the weights, never the
    whole model (off: every rank materialises it first; for comparisons only)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, ~30% more compute)."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    eval_every: int = 0
    """Evaluate on the mixture's held-out split every this many steps and at the last (0: never), with the
    live model on the training devices, the items shared among ranks. Writes output_dir/eval/step-N.json."""
    eval_at_end: bool = False
    """Evaluate at the last step even when eval_every is 0 (what grid cells do)."""
    eval_suite: tuple[Literal["understanding", "generation"], ...] = ("understanding", "generation")
    """What `eval_every` evaluates."""
    eval_max_per_source: int = 64
    """Held-out samples per source that `eval_every` evaluates."""
    seed: int = 0
    """Seed of the model's initialisation."""
    deepspeed: str | None = path_field(None)
    """DeepSpeed JSON; default infra/deepspeed/zero3_cpu.json on CPU, zero3_gpu_bf16.json on GPU."""
    loggers: tuple[Literal["tensorboard", "wandb"], ...] = ("tensorboard",)
    """Metric sinks besides metrics.jsonl: TensorBoard event files in output_dir/tensorboard, W&B (offline
    unless WANDB_MODE says otherwise). W&B is also added when WANDB_API_KEY or WANDB_MODE is set."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device, for the MFU estimate; default: known GPUs (H100/H200 989,
    A100 312); none on CPU."""

    def __post_init__(self):
        problems = []
        for name in (
            "micro_batch_size",
            "grad_accum",
            "save_every",
            "lr_reference_batch",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_max_per_source < 1:
            problems.append(
                f"eval_every / eval_max_per_source: expected >= 0 / >= 1, got {self.eval_every} / "
                f"{self.eval_max_per_source}"
            )
        if (self.eval_every or self.eval_at_end) and self.data.mixture is None:
            problems.append(
                "eval_every/eval_at_end: evaluation needs data.mixture with a heldout split (synthetic data has none)"
            )
        if not self.lr > 0:
            problems.append(f"lr: expected > 0, got {self.lr}")
        if self.max_steps is None and self.data.mixture is None:
            problems.append("max_steps: null (one pass over the mixture) needs data.mixture; give a number of steps")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps: expected an integer >= 1 (or null: one pass), got {self.max_steps}")
        if self.warmup_steps < 0 or self.warmup_steps > (self.max_steps or self.warmup_steps):
            problems.append(f"warmup_steps: expected 0..max_steps ({self.max_steps}), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio: expected 0..1, got {self.min_lr_ratio}")
        if self.stage not in (1, 2):
            problems.append(f"stage: expected 1 (frozen LLM) or 2 (all), got {self.stage!r}")
        if self.stage2_from_phase and (self.stage != 1 or self.data.mixture is None or self.model.init_from):
            problems.append(
                "stage2_from_phase: switches from stage 1 to stage 2 at a phase of data.mixture; it needs "
                "stage: 1 and a mixture, and sets model.init_from itself"
            )
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainJob:
    resume: bool = False
    """Continue output_dir from its latest complete checkpoint (the same samples, the same losses)."""


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A training YAML (relative paths resolve against its folder) with dotted `overrides`."""
    return load((TrainConfig,), config=path, sets=list((overrides or {}).items()))[0]
