"""Checkpoints: DeepSpeed ZeRO-3 state + the data position + the mixture plan's hash.

Layout under the run folder:

    checkpoints/step-00000200/       DeepSpeed's files (every rank's shard of params/optimizer)
    checkpoints/step-00000200/vpit_state.json   {"step", "global_batch", "plan_hash", "world_size"},
                                     written last, by rank 0, after every rank has saved: a
                                     checkpoint without it is incomplete and ignored.
    checkpoints/step-00000200/universal/        the same state re-cut per parameter, made when a
                                     run resumes on another number of ranks

The data position is the optimizer step; the stream is a pure function of (plan, global batch,
step), so a resumed run sees exactly the samples an uninterrupted one would, on any number of
ranks and loader workers, as long as the global batch is the same.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from vpit.common import save_json_atomic
from vpit.errors import ConfigError
from vpit.train.parallelize import barrier

__all__ = [
    "CKPT_DIR",
    "ResumeState",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
    "universal_checkpoint",
]

CKPT_DIR = "checkpoints"
STATE = "vpit_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeState:
    step: int
    """Optimizer steps done: the data position (step k trains on global batch k)."""
    global_batch: int
    """Samples per optimizer step (micro_batch_size x world_size x grad_accum); a resume keeps it."""
    plan_hash: str
    """Hash of the mixture plan; a resume under another plan is refused."""
    world_size: int
    """Ranks that wrote the shards; another world size resumes through a universal checkpoint."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "checkpoint") -> "ResumeState":
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d]
        if missing:
            raise ConfigError(
                f"{where}: written by an older vpit (no {', '.join(missing)} in {STATE}); it cannot be "
                "resumed: export it, or start a new output_dir"
            )
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CKPT_DIR
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        m = _TAG.match(d.name)
        if m and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(engine: Any, run_dir: Path, state: ResumeState, rank: int, keep: int) -> Path:
    root = Path(run_dir) / CKPT_DIR
    tag = tag_of(state.step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"vpit": state.to_dict()})
    barrier()  # every rank's shard is on disk before the checkpoint is declared complete
    if rank == 0:
        save_json_atomic(root / tag / STATE, state.to_dict())
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def read_state(ckpt: Path) -> ResumeState:
    return ResumeState.from_dict(json.loads((ckpt / STATE).read_text()), where=str(ckpt))


UNIVERSAL = "universal"


def universal_checkpoint(ckpt: Path) -> Path:
    """CKPT/universal: the checkpoint re-cut per parameter by DeepSpeed's ds_to_universal, which any
    world size loads. Made once (a folder with its `done` marker is reused)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from vpit.common import muted

    out = Path(ckpt) / UNIVERSAL
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with muted():  # it narrates every step
        ds_to_universal(args)
    _slim_optimizer_state(out / "zero" / "optimizer_state.pt")
    (out / "done").write_text("")
    return out


def _slim_optimizer_state(path: Path) -> None:
    """Keep only the scalars of universal/zero/optimizer_state.pt. ds_to_universal copies rank 0's
    whole optimizer file into it (its fp32 partition and both Adam moments), and every resuming
    rank loads it in full only to read the step, the loss scaler and the param groups; the
    per-parameter files hold the real state. At 0.5B from world 1 that was 6.5 GB more per rank."""
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=False)
    sd.pop("fp32_flat_groups", None)
    inner = sd["optimizer_state_dict"]
    inner["state"] = {k: {"step": v["step"]} for k, v in inner["state"].items()}
    torch.save(sd, path)


def load_checkpoint(engine: Any, ckpt: Path, universal: bool = False) -> None:
    """Load model, optimizer and schedule state; from CKPT/universal when the world size changed
    (the engine must then be built with checkpoint.load_universal)."""
    load_dir, tag = (ckpt, UNIVERSAL) if universal else (ckpt.parent, ckpt.name)
    path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load {ckpt}")
