"""One run, two stages: a MetaMorph recipe as one mixture spec and one `vpit train`.

With `stage: 1` and `stage2_from_phase: NAME`, the run trains stage 1 (the LLM frozen, the
projector on the text loss) on every step before the first one that holds a sample of the
mixture's phase NAME, in RUN/stage1; exports it to RUN/stage1/export; then trains stage 2
(everything) in RUN from that export (`model.init_from`) up to max_steps. The sample sequence
is the spec's, unbroken: stage 2's first batch is the one after stage 1's last (a batch that
straddles the boundary trains in stage 2). Each stage runs its own learning-rate schedule
(warmup, then decay to its end); `--resume` continues whichever stage was cut.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
from pathlib import Path
from typing import Any

from vpit.errors import ConfigError
from vpit.train.config import TrainConfig

__all__ = ["first_stage2_step", "train_in_stages"]


def first_stage2_step(cfg: TrainConfig, global_batch: int, plan: Any) -> int:
    """Steps of stage 1: those before the first step that holds a sample of the named phase."""
    steps = {name: first for name, first, _ in plan.phase_steps(global_batch)}
    if cfg.stage2_from_phase not in steps:
        raise ConfigError(
            f"stage2_from_phase: the mixture has no phase {cfg.stage2_from_phase!r} (its phases: {', '.join(steps)})"
        )
    done = steps[cfg.stage2_from_phase] - 1
    if done < 1:
        raise ConfigError(
            f"stage2_from_phase: phase {cfg.stage2_from_phase!r} starts in the first step, leaving stage 1 "
            "nothing to train; name a later phase"
        )
    if done >= (cfg.max_steps or done + 1):
        raise ConfigError(
            f"stage2_from_phase: phase {cfg.stage2_from_phase!r} starts at step {done + 1}, after max_steps "
            f"{cfg.max_steps}; raise max_steps or name an earlier phase"
        )
    return done


def train_in_stages(cfg: TrainConfig, resume: bool) -> dict[str, Any]:
    from vpit.train.checkpoint import latest_checkpoint
    from vpit.train.data import make_source
    from vpit.train.export import export_checkpoint
    from vpit.train.parallelize import barrier, init_distributed
    from vpit.train.trainer import Trainer

    dist = init_distributed()
    global_batch = cfg.micro_batch_size * dist.world_size * cfg.grad_accum
    run = Path(cfg.output_dir)
    source = make_source(cfg.data, global_batch, cfg.model, run / "plan")  # planned once, for both stages
    done = first_stage2_step(cfg, global_batch, source.plan)
    first, export = run / "stage1", run / "stage1" / "export"
    if not (export / "vpit.json").is_file():
        one = dataclasses.replace(
            cfg,
            output_dir=str(first),
            stage=1,
            stage2_from_phase=None,
            max_steps=done,
            warmup_steps=min(cfg.warmup_steps, done),
            save_every=min(cfg.save_every, done),
            eval_every=0,
            eval_at_end=False,
        )
        trainer = Trainer(one, source=source, resume=resume)
        summary = trainer.train()
        del trainer  # its engine's buffers go before stage 2 builds its own
        gc.collect()
        if summary["preempted"]:  # stage 1's checkpoint is saved; --resume goes on from it
            return summary
        if dist.rank == 0:
            tmp = first / f"export.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            export_checkpoint(first, tmp)
            os.replace(tmp, export)
            print(f"stage 1 done ({done} steps), exported to {export}; stage 2 starts at step {done + 1}", flush=True)
        barrier()
    elif not resume and latest_checkpoint(run) is None:
        raise ConfigError(
            f"output_dir {run} already holds stage 1 ({export}); pass --resume to go on with stage 2, "
            "or choose another output_dir"
        )
    two = dataclasses.replace(
        cfg, stage=2, stage2_from_phase=None, model=dataclasses.replace(cfg.model, init_from=str(export))
    )
    return Trainer(two, source=source, resume=resume, start_step=done).train()
