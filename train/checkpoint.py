"""Checkpoints: DeepSpeed ZeRO-3 state + the data position + the mixture plan's hash.

Layout under the run folder:

    checkpoints/step-00000200/       DeepSpeed's files (every rank's shard of params/optimizer)
    checkpoints/step-00000200/vpit_state.json   {"step", "micro_steps", "plan_hash", ...}, written
                                     last, by rank 0, after every rank has saved: a checkpoint
                                     without it is incomplete and ignored.

The data position is the number of global micro batches consumed; the stream is a pure
function of (plan, position), so a resumed run sees exactly the samples an uninterrupted
one would, on any number of loader workers.
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

__all__ = ["CKPT_DIR", "ResumeState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CKPT_DIR = "checkpoints"
STATE = "vpit_state.json"
_TAG = re.compile(r"^step-(\d{8})$")


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeState:
    step: int
    """Optimizer steps done."""
    micro_steps: int
    """Global micro batches consumed from the stream."""
    plan_hash: str
    """Hash of the mixture plan; a resume under another plan is refused."""
    world_size: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResumeState":
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


def load_checkpoint(engine: Any, ckpt: Path, plan_hash: str) -> ResumeState:
    """Load model, optimizer and schedule state; check the plan."""
    state = ResumeState.from_dict(json.loads((ckpt / STATE).read_text()))
    if state.plan_hash != plan_hash:
        raise ConfigError(
            f"--resume: checkpoint {ckpt} was trained on mixture plan {state.plan_hash}, but the "
            f"config now gives plan {plan_hash}; resume with the same mixture or use a new output_dir"
        )
    path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load {ckpt}")
    return state
