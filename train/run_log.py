"""Training metrics: metrics.jsonl (always), TensorBoard / W&B (when asked), loss.png at the end.

A resumed run appends to the same files, so a step may appear twice (logged by the killed
run after its last checkpoint, then again after the resume); `read_metrics` keeps the last
row of each step, which is the trajectory the finished run actually followed.
Per-rank sample ids go to samples-rank{r}.jsonl, so a run's exact data order can be audited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vpit.errors import ConfigError

__all__ = ["RunLog", "peak_flops", "plot_losses", "read_metrics"]


def read_jsonl_by_step(path: Path) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return read_jsonl_by_step(Path(run_dir) / "metrics.jsonl")


# Dense bf16 peak of one device, in FLOP/s, by name (what MFU is measured against).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(tflops: float | None, device: Any) -> float | None:
    """The peak FLOP/s for MFU: the configured one, a known GPU's, or None (CPU, unknown GPU)."""
    if tflops:
        return tflops * 1e12
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "text_loss", "text loss (CE)"), (axes[1], "vision_loss", "vision loss (1 - cos)")):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class RunLog:
    """Writes metrics on rank 0 and sample ids on every rank."""

    def __init__(self, run_dir: Path, rank: int, loggers: tuple[str, ...] = (), config: dict[str, Any] | None = None):
        self.run_dir, self.rank = Path(run_dir), rank
        self.sinks: list[Any] = []
        names = list(loggers)
        if "wandb" not in names and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
            names.append("wandb")  # a W&B user has it configured
        if rank == 0:
            for name in names:
                self.sinks.append(self._sink(name, config or {}))

    def _sink(self, name: str, config: dict[str, Any]) -> Any:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                return SummaryWriter(str(self.run_dir / "tensorboard"))
            import wandb

            self.run_dir.mkdir(parents=True, exist_ok=True)
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", "vpit"),
                dir=str(self.run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE", "offline"),
            )
        except ImportError as e:
            raise ConfigError(
                f"loggers: {name} was asked for but is not installed ({e}); "
                f"pip install {'tensorboard' if name == 'tensorboard' else 'wandb'} or drop it"
            ) from None

    def log(self, row: dict[str, Any], sample_ids: list[str]) -> None:
        with open(self.run_dir / f"samples-rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": row["step"], "ids": sample_ids}) + "\n")
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(sink, "add_scalar"):
                for k, v in scalars.items():
                    sink.add_scalar(k, v, row["step"])
            else:
                sink.log(scalars, step=row["step"])

    def finish(self) -> Path | None:
        if self.rank != 0:
            return None
        for sink in self.sinks:
            (sink.close if hasattr(sink, "close") else sink.finish)()
        rows = read_metrics(self.run_dir)
        return plot_losses(rows, self.run_dir / "loss.png") if rows else None
